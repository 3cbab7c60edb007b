# Sourced by the device-session scripts: installs the carried wheels (.whl) into /tmp/site, sets PYTHONPATH,
# and records the device, torch/lightning versions and free memory under $OUT.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:. || exit 1
export PYTHONUNBUFFERED=1
# NVLink multicast stays off on the lent boxes (device README / KINDS.md: it can put shared GPUs out of service);
# exported, so the ranks Lightning's launcher starts inherit them
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" | tee -a "$OUT/device.txt"
free -g | tee -a "$OUT/device.txt"
