. bench/device_env.sh
nproc; python3 -c "import torch; print('threads', torch.get_num_threads())"
python3 bench/kernels.py --model llama-3.2-3b 2>&1 | grep -v Warn | tail -8
t0=$(date +%s); timeout 300 python3 -c "
import torch, deepspeed
from deepspeed.ops.adam import DeepSpeedCPUAdam
p=[torch.nn.Parameter(torch.randn(1000))]; o=DeepSpeedCPUAdam(p); p[0].grad=torch.randn(1000); o.step(); print('ds ok', deepspeed.__version__)
" 2>&1 | tail -5; echo "ds build s: $(( $(date +%s) - t0 ))"
