"""An answer in words (the terminal), as data (`--json`) and as a picture (`--plot`)."""

from __future__ import annotations

from typing import Any

from planner.advice import lane_words
from planner.plan import Answer
from megatrain_lightning import schedule as S
from planner.workload import GiB

LANE_TITLES = {S.COMPUTE: "GPU compute", S.H2D: "H2D", S.D2H: "D2H", S.CPU: "CPU (optimizer)",
               S.NVME_READ: "NVMe read", S.NVME_WRITE: "NVMe write", S.COLLECTIVE: "GPU-to-GPU"}


def _size(nbytes: float, decimal: bool = False) -> str:
    """Memory in binary units (GiB, TiB); `decimal`: a drive's bytes in TB, as drives are sold."""
    if decimal and nbytes >= 1e12:
        return f"{nbytes / 1e12:.2f} TB"
    if not decimal and nbytes >= 2**40:
        return f"{nbytes / 2**40:.2f} TiB"
    return f"{nbytes / GiB:.1f} GiB" if nbytes >= GiB / 10 else f"{nbytes / 2**20:.1f} MiB"


def _tier_size(tier, nbytes: float) -> str:
    return _size(nbytes, decimal=tier.name == "NVMe")


def _duration(s: float) -> str:
    for unit, n in (("days", 86400), ("h", 3600), ("min", 60)):
        if s >= n:
            return f"{s / n:.1f} {unit}"
    return f"{s:.1f} s"


def verdict(a: Answer) -> str:
    if a.fits:
        return "FITS"
    short = [f"{t.name} short by {_tier_size(t, t.short_bytes)} (needs {_tier_size(t, t.need_bytes)}, has "
             f"{_tier_size(t, t.capacity_bytes)})" for t in a.tiers if not t.fits]
    return "DOES NOT FIT: " + "; ".join(short)


def text(a: Answer, tokens: float) -> str:
    wl, hw, c = a.wl, a.hw, a.wl.model
    lines = [
        f"megatrain plan: {c.name} ({c.n_params / 1e9:.3g}B parameters"
        + (f", {c.active_params / 1e9:.3g}B active: {c.experts_per_token} of {c.n_experts} experts"
           if c.n_experts else "") + f", {c.n_layer} layers) on {hw.name} "
        f"({hw.gpu}), storage={wl.storage}, {wl.precision}"
        + (f", LoRA r={wl.lora_r} on a frozen base ({wl.n_layers * wl.adapter_params / 1e6:.3g}M adapter parameters)"
           if wl.lora_r else ""),
        f"  {wl.micro_batch} x {wl.seq_len} tokens x accumulate {wl.accumulate}"
        + (f" x {wl.ranks} ranks ({wl.nodes} node{'s' * (wl.nodes > 1)}; the timeline is rank 0's)" if wl.ranks > 1
           else "") + f" = {wl.step_tokens:,} tokens/step; "
        f"checkpoint_interval {wl.checkpoint_interval}, prefetch_depth {wl.prefetch_depth}, stream {wl.resolved_stream}",
        "",
        verdict(a),
        "",
        f"  {'tier':<12} {'peak':>11} {'capacity':>11} {'use':>5}",
    ]
    for t in a.tiers:
        use = t.need_bytes / t.capacity_bytes if t.capacity_bytes else float("inf")
        lines.append(f"  {t.name:<12} {_tier_size(t, t.need_bytes):>11} {_tier_size(t, t.capacity_bytes):>11} "
                     f"{use:>5.0%}  {t.note}")
    lane, share = a.bottleneck
    cpu = {k: a.timeline.busy_s(S.CPU, k) for k in (S.OPTIMIZER, S.CAST, S.ACCUMULATE)}
    busy = " | ".join(f"{LANE_TITLES[k]} {v:.2f} s" for k, v in a.busy_s.items() if v > 0)
    lines += [
        "",
        f"  step time       {a.step_time_s:.3f} s   ({a.tokens_per_s:,.0f} tokens/s, {a.model_tflops:.1f} model TFLOPS "
        "= 6 N tokens / step time" + ("; LoRA skips the base's weight gradients, a third of 6 N)" if wl.lora_r else ")"),
        f"  {tokens:.3g} tokens    {_duration(tokens / a.tokens_per_s)}",
        f"  busy per step   {busy}",
        f"                  CPU: optimizer {cpu[S.OPTIMIZER]:.2f} s, cast {cpu[S.CAST]:.2f} s, "
        f"gradient accumulation {cpu[S.ACCUMULATE]:.2f} s",
        f"  bottleneck      {lane_words(lane)}: busy {share:.0%} of the step (GPU computes {a.compute_share:.0%})",
        f"  sweep           chunks of {wl.chunk_sequences} sequence{'s' * (wl.chunk_sequences > 1)} "
        f"({wl.n_chunks} per micro-batch)" + (f"; long context: the MLP half runs {wl.token_chunk:,} tokens at a time"
                                              if wl.token_chunk else "") + (f"; step cache: {len(wl.cached)} of {wl.n_layers + 1} units' weights "
                                              f"and gradient sums on the GPU ({_size(wl.cached_bytes)})"
                                              if wl.cached else ""),
        f"  activations     the last {wl.kept_blocks} of {len(wl.plan.blocks)} blocks keep theirs for backward (no "
        f"load, no recompute there; {_size(wl.kept_blocks * wl.checkpoint_interval * wl.kept_layer_bytes)})"
        if wl.kept_blocks else "  activations     every block is recomputed in backward",
    ]
    if a.advice:
        lines += ["", "advice:"] + [f"  - {x}" for x in a.advice]
    return "\n".join(lines)


def as_dict(a: Answer, tokens: float) -> dict[str, Any]:
    wl, hw = a.wl, a.hw
    lane, share = a.bottleneck
    return dict(
        fits=a.fits, verdict=verdict(a), model=wl.model.name, n_params=wl.model.n_params,
        active_params=wl.model.active_params, hardware=hw.name,
        storage=wl.storage, stream=wl.resolved_stream, n_nvme_layers=wl.n_nvme_layers, precision=wl.precision,
        micro_batch=wl.micro_batch, seq_len=wl.seq_len, accumulate=wl.accumulate, tokens_per_step=wl.step_tokens,
        checkpoint_interval=wl.checkpoint_interval, prefetch_depth=wl.prefetch_depth,
        chunk_sequences=wl.chunk_sequences, n_chunks=wl.n_chunks, token_chunk=wl.token_chunk, kept_units=list(wl.kept),
        kept_blocks=wl.kept_blocks,
        step_cached_units=list(wl.cached),
        tiers=[dict(name=t.name, need_bytes=t.need_bytes, capacity_bytes=t.capacity_bytes, fits=t.fits)
               for t in a.tiers],
        gpu_allocated_peak_bytes=a.timeline.gpu_peak_bytes,  # comparable to torch.cuda.max_memory_allocated
        step_time_s=a.step_time_s, tokens_per_s=a.tokens_per_s, model_tflops=a.model_tflops,
        train_tokens=tokens, train_time_s=tokens / a.tokens_per_s,
        busy_s=a.busy_s, busy_by_kind_s=_by_kind(a),
        bottleneck=dict(lane=lane, share=share), compute_share=a.compute_share, advice=a.advice)


def _by_kind(a: Answer) -> dict[str, float]:
    out: dict[str, float] = {}
    for s in a.timeline.spans:
        out[f"{s.lane}/{s.kind}"] = out.get(f"{s.lane}/{s.kind}", 0.0) + s.duration
    return out


def plot(a: Answer, path: str) -> list[str]:
    """One lane per resource over the step, and each tier's memory over the step; returns the memory panel's
    legend entries."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit("--plot needs matplotlib: pip install 'megatrain-lightning[plot]'") from e
    lanes = [lane for lane in S.LANES if any(s.lane == lane for s in a.timeline.spans)] or [S.COMPUTE]
    kinds = sorted({s.kind for s in a.timeline.spans})
    colors = {k: plt.cm.tab10(i % 10) for i, k in enumerate(kinds)}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 6), sharex=True, gridspec_kw=dict(height_ratios=[3, 2]))
    for y, lane in enumerate(lanes):
        for kind in kinds:
            bars = [(s.start, s.duration) for s in a.timeline.spans if s.lane == lane and s.kind == kind]
            if bars:
                top.broken_barh(bars, (y - 0.4, 0.8), color=colors[kind], label=kind)
    handles = {h.get_label(): h for h in top.get_legend_handles_labels()[0]}
    # beside the lanes, not over them
    top.legend(handles.values(), handles.keys(), loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    top.set_yticks(range(len(lanes)), [LANE_TITLES[lane] for lane in lanes])
    top.invert_yaxis()
    top.set_title(f"{a.wl.model.name} on {a.hw.name}: {a.step_time_s:.2f} s/step, {a.model_tflops:.0f} model TFLOPS "
                  f"- {verdict(a)}", fontsize=9)
    times, levels = zip(*a.timeline.gpu_curve())
    bottom.step(times, [v / GiB for v in levels], where="post", label="GPU allocated", color="C0")
    gpu = next((t for t in a.tiers if t.name == "GPU"), None)
    if gpu is not None:  # what it is allowed to reach
        bottom.hlines(gpu.capacity_bytes / GiB, 0, a.step_time_s, colors="C0", linewidth=0.8,
                      label=f"GPU capacity {gpu.capacity_bytes / GiB:.0f} GiB")
    # flat tiers (an empty NVMe tier left out); pinned host memory is part of RAM: dotted, drawn over it
    flat = [t for t in a.tiers if t.name != "GPU" and t.need_bytes > 0]
    for i, t in enumerate(sorted(flat, key=lambda t: t.name == "pinned host")):
        bottom.hlines(t.need_bytes / GiB, 0, a.step_time_s, linestyles="dotted" if t.name == "pinned host"
                      else "dashed", label=f"{t.name} {_tier_size(t, t.need_bytes)}", color=f"C{i + 1}", zorder=3)
    bottom.set_ylabel("GiB")
    bottom.set_xlabel("seconds into the step")
    bottom.set_yscale("log")
    legend = bottom.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [t.get_text() for t in legend.get_texts()]
