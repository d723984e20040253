#!/usr/bin/env bash
# One GPU-machine call: per-step and end-to-end Flux.1-dev timings, 1 GPU vs 2 and 4 GPUs, same machine.
# Usage (on a 4-GPU machine, from the repo root, with the wheels of requirements_taco_dit.txt carried in
# .whl/): bash benchmarks/run_gpu_suite.sh [speed|round2|round3|s3|s4|s5|s6|s7|s8|s9|s10|s11|s12|s13|s14|s15|s16|s17|s18|s19|s20|s21|s22|s23|s24|s25|s26|s27|s28|s29|s30|s31|s32|s33|s34|s35|s36|s37|s38|s39|s40|s41|s42|s43|s44|s45|s46|s47|s48|s49|s50|s51|s52|s53|s54|s55|s56|s57|s58|s59|s60|s61|s62|s63|s64|s65|s66|s67|s68|s69|s70|s71|s72|s73|s74|s75|s76|s77|s78|s79|next|step|e2e|wan|all]   Results: $OUT/*.jsonl
# Each part fits one 10-minute device call on its own; "all" does not.
# "speed": attention kernels, then 1-GPU Flux and Wan 14B (ours with both attention kernels, diffusers as
# shipped and with cuDNN forced) side by side on GPUs 0 and 1, then Flux and Wan on 4 and 2 GPUs.
set -uo pipefail
what="${1:-all}"
export PYTHONUNBUFFERED=1 OUT="${OUT:-/tmp/taco-out}"
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
ngpu=$(nvidia-smi -L | wc -l)
filter() { grep -E '^\{|Error|error:' | grep -v Warning; }
# shared by the fifth session's parts: the 1-GPU Flux steps (GPU 0; sizes as arguments), the 1-GPU fork path
# (GPU 1), and the N-GPU fork path compared with the 1-GPU run's PNG
flux_steps_1gpu() { CUDA_VISIBLE_DEVICES=0 timeout 170 python3 benchmarks/bench_flux_step.py --sizes "$@" --graph \
  --out "$OUT/step.jsonl" 2>&1; }
fork_1gpu() { CUDA_VISIBLE_DEVICES=1 timeout 130 python3 benchmarks/bench_fork_e2e.py --size 1024 --steps 20 \
  --tag 1gpu --out "$OUT/e2e.jsonl" 2>&1; }
fork_ngpu() { timeout "${2:-110}" torchrun --nproc_per_node="$1" benchmarks/bench_fork_e2e.py --size 1024 --steps 20 \
  --tag "auto$1" --reference /tmp/taco-bench/1gpu-rank0/output/bench_00002_.png --out "$OUT/e2e.jsonl" 2>&1; }
fj() { grep -E '^\{|Error|error:|Traceback' | grep -v Warning; }
# seventh session: the 1-GPU Flux 1024² step on GPU 2 (in the background: `wait` for it) beside a 2-GPU run of the
# configurations given on GPUs 0-1
flux_1024_beside_2gpu() {
  ( CUDA_VISIBLE_DEVICES=2 timeout 200 python3 benchmarks/bench_flux_step.py --sizes 1024 --graph \
      --out "$OUT/step.jsonl" 2>&1 | fj ) &
  CUDA_VISIBLE_DEVICES=0,1 timeout 220 torchrun --nproc_per_node=2 benchmarks/bench_flux_step.py --sizes 1024 --graph \
    --configs "$@" --out "$OUT/step_2gpu.jsonl" 2>&1 | fj
}
# eighth session: the fork path at 1024², 1 GPU (on the GPU given) then 2 GPUs (0-1, automatic plan), three
# runs each (the third reported, compared with the 1-GPU PNG of the same seed); full logs in $OUT
fork_1gpu_then_2gpu() {
  fk() { grep -E '^\{|Error|error:|refused|did not shut down|TACO-DiT plan' | grep -v Warning; }
  CUDA_VISIBLE_DEVICES=$1 timeout 130 python3 benchmarks/bench_fork_e2e.py --size 1024 --steps 20 --runs 3 \
    --tag 1gpu --out "$OUT/e2e.jsonl" > "$OUT/fork_1gpu.log" 2>&1; fk < "$OUT/fork_1gpu.log"
  CUDA_VISIBLE_DEVICES=0,1 timeout 130 torchrun --nproc_per_node=2 benchmarks/bench_fork_e2e.py --size 1024 \
    --steps 20 --runs 3 --tag auto2 --reference /tmp/taco-bench/1gpu-rank0/output/bench_00003_.png \
    --out "$OUT/e2e.jsonl" > "$OUT/fork_2gpu.log" 2>&1; fk < "$OUT/fork_2gpu.log"
}
# ninth session: the Flux 1024² step (CUDA graph) on 1 GPU in the background ($1: GPU, $2: output file, then
# VAR=value settings; `wait` for it), and on 2 GPUs (0-1, ring 2 gathered; $1: output file, then settings)
flux_1gpu_bg() { local gpu=$1 out=$2; shift 2
  ( env CUDA_VISIBLE_DEVICES="$gpu" "$@" timeout 200 python3 benchmarks/bench_flux_step.py --sizes 1024 --graph \
      --out "$OUT/$out" 2>&1 | fj ) & }
flux_r2() { local out=$1; shift
  echo "2 GPUs${*:+, $*}"
  env CUDA_VISIBLE_DEVICES=0,1 "$@" timeout 120 torchrun --nproc_per_node=2 benchmarks/bench_flux_step.py \
    --sizes 1024 --graph --configs r2 --out "$OUT/$out" 2>&1 | fj; }
# twelfth session: wave_attention's GPU tests on GPU 3, then Flux 1024² on 2 GPUs (0-1, ring 2, CUDA graph) with
# TACO_WAVE_ATTN=1, 0, 1, 0, the 1-GPU step beside on GPUs 2 and 3
wave_on_off() {
  CUDA_VISIBLE_DEVICES=3 timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_wave_attention_gpu.py \
    2>&1 | tail -2
  for g in 2 3; do flux_1gpu_bg $g "step_gpu$g.jsonl"; done
  for m in 1 0 1 0; do flux_r2 "step_2gpu_wave$m.jsonl" TACO_WAVE_ATTN=$m; done
  wait
}
# the fork path on 4 GPUs after fork_1gpu_then_2gpu (three runs, compared with its 1-GPU PNG)
fork_4gpu_after() {
  timeout 130 torchrun --nproc_per_node=4 benchmarks/bench_fork_e2e.py --size 1024 --steps 20 --runs 3 --tag auto4 \
    --reference /tmp/taco-bench/1gpu-rank0/output/bench_00003_.png --out "$OUT/e2e.jsonl" > "$OUT/fork_4gpu.log" 2>&1
  grep -E '^\{|Error|error:|refused|did not shut down|TACO-DiT plan' "$OUT/fork_4gpu.log" | grep -v Warning
}
# thirteenth session: every GPU's SM clock and power sampled every 200 ms (nvidia-smi) between smi_start FILE and
# smi_stop FILE, which prints each GPU's mean over the samples at >= 90 % utilization. The sampler runs in the
# background: between the two, wait for given PIDs, never a bare `wait`
smi_start() {
  nvidia-smi --query-gpu=timestamp,index,clocks.sm,power.draw,utilization.gpu --format=csv,noheader,nounits \
    -lms 200 > "$1" 2>&1 &
  smi_pid=$!
}
smi_stop() {
  kill "$smi_pid"
  python3 - "$1" <<'PY'
import collections, sys
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    parts = [p.strip() for p in line.split(",")]
    if len(parts) == 5 and parts[1].isdigit():
        try:
            rows[int(parts[1])].append((float(parts[2]), float(parts[3]), float(parts[4])))
        except ValueError:
            pass
for gpu, vals in sorted(rows.items()):
    busy = [v for v in vals if v[2] >= 90]
    if busy:
        n = len(busy)
        print(f"GPU {gpu}: {n} samples at >= 90 % utilization: SM {sum(v[0] for v in busy) / n:.0f} MHz, "
              f"power {sum(v[1] for v in busy) / n:.0f} W")
PY
}
if [ "$what" = speed ]; then
  ( CUDA_VISIBLE_DEVICES=0 python3 benchmarks/probe_attention.py --out "$OUT/attention.jsonl" 2>&1 | filter
    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/bench_flux_step.py --sizes 1024 2048 --graph --attention sdpa cudnn \
      --diffusers --diffusers-attention default cudnn --out "$OUT/step.jsonl" 2>&1 | filter ) &
  ( CUDA_VISIBLE_DEVICES=1 python3 benchmarks/bench_wan_step.py --attention sdpa cudnn --diffusers \
      --diffusers-attention default cudnn --out "$OUT/wan_step.jsonl" 2>&1 | filter ) &
  wait
  [ "$ngpu" -ge 4 ] && torchrun --nproc_per_node=4 benchmarks/bench_flux_step.py --sizes 1024 2048 --graph \
    --attention cudnn sdpa --configs u4 --out "$OUT/step.jsonl" 2>&1 | filter
  [ "$ngpu" -ge 4 ] && torchrun --nproc_per_node=4 benchmarks/bench_wan_step.py --graph --configs u4 \
    --out "$OUT/wan_step.jsonl" 2>&1 | filter
  torchrun --nproc_per_node=2 benchmarks/bench_flux_step.py --sizes 1024 2048 --graph --configs u2 \
    --out "$OUT/step.jsonl" 2>&1 | filter
fi
if [ "$what" = round2 ]; then
  # A: four one-GPU jobs side by side (Flux steps, Wan 14B steps, the 1-GPU fork path, a profile)
  ( CUDA_VISIBLE_DEVICES=0 timeout 280 python3 benchmarks/bench_flux_step.py --sizes 1024 2048 --graph --fused on off \
      --diffusers --diffusers-attention default flash --out "$OUT/step.jsonl" 2>&1 | filter ) &
  ( CUDA_VISIBLE_DEVICES=1 timeout 280 python3 benchmarks/bench_wan_step.py --fused on off --diffusers \
      --out "$OUT/wan_step.jsonl" 2>&1 | filter ) &
  ( export CUDA_VISIBLE_DEVICES=2; timeout 280 bash -c "python3 benchmarks/bench_fork_e2e.py --size 1024 --steps 20 \
      --tag 1gpu --out $OUT/e2e.jsonl; python3 benchmarks/bench_fork_e2e.py --size 1024 --steps 20 --tag 1gpug \
      --cuda-graph on --out $OUT/e2e.jsonl" 2>&1 | filter ) &
  ( CUDA_VISIBLE_DEVICES=3 timeout 200 python3 benchmarks/profile_flux_step.py --sizes 1024 2048 \
      --out "$OUT/profile.jsonl" >/dev/null 2>&1 ) &
  wait
  ref=/tmp/taco-bench/1gpu-rank0/output/bench_00002_.png
  # B: the fork path on 4 GPUs, then Wan and Flux steps under Ulysses 4, then 2 GPUs (two pairs at once)
  timeout 150 torchrun --nproc_per_node=4 benchmarks/bench_fork_e2e.py --size 1024 --steps 20 --tag auto4 \
    --reference $ref --out "$OUT/e2e.jsonl" 2>&1 | filter
  timeout 150 torchrun --nproc_per_node=4 benchmarks/bench_wan_step.py --graph --configs u4 \
    --out "$OUT/wan_step.jsonl" 2>&1 | filter
  timeout 100 torchrun --nproc_per_node=4 benchmarks/bench_flux_step.py --sizes 1024 2048 --graph --configs u4 \
    --out "$OUT/step.jsonl" 2>&1 | filter
  ( CUDA_VISIBLE_DEVICES=0,1 timeout 100 torchrun --nproc_per_node=2 --master_port 29611 benchmarks/bench_flux_step.py \
      --sizes 1024 --graph --configs u2 --out "$OUT/step.jsonl" 2>&1 | filter ) &
  ( CUDA_VISIBLE_DEVICES=2,3 timeout 100 torchrun --nproc_per_node=2 --master_port 29612 benchmarks/bench_fork_e2e.py \
      --size 1024 --steps 20 --tag auto2 --reference $ref --out "$OUT/e2e.jsonl" 2>&1 | filter ) &
  wait
fi
if [ "$what" = round3 ]; then
  # the fork path with CUDA graphs on their default (auto): 1 GPU eager, 4 GPUs, 2 GPUs; launch cost probe
  ( CUDA_VISIBLE_DEVICES=1 timeout 60 python3 benchmarks/probe_launch.py 2>&1 | filter ) &
  CUDA_VISIBLE_DEVICES=0 timeout 90 python3 benchmarks/bench_fork_e2e.py --size 1024 --steps 20 --tag 1gpu \
    --out "$OUT/e2e.jsonl" 2>&1 | filter
  wait
  ref=/tmp/taco-bench/1gpu-rank0/output/bench_00002_.png
  timeout 120 torchrun --nproc_per_node=4 benchmarks/bench_fork_e2e.py --size 1024 --steps 20 --tag auto4 \
    --reference $ref --out "$OUT/e2e.jsonl" 2>&1 | grep -E '^\{|Error|error|CUDA graph|TACO-DiT' | grep -v Warning
  timeout 80 torchrun --nproc_per_node=2 benchmarks/bench_fork_e2e.py --size 1024 --steps 20 --tag auto2 \
    --reference $ref --out "$OUT/e2e.jsonl" 2>&1 | filter
fi
if [ "$what" = s3 ]; then
  # A (side by side): kernel variants + diffusers on GPU 0; 1-GPU fork path then a 1-GPU profile on GPU 1;
  # Ulysses-2 profiles (eager, graph) and 2-GPU steps at 1024² and 2048² on GPUs 2-3
  f3() { grep -E '^\{|Error|error:|Fused q/k' | grep -v Warning; }
  ( CUDA_VISIBLE_DEVICES=0 timeout 300 python3 benchmarks/bench_flux_step.py --sizes 1024 2048 --graph \
      --fused on off --diffusers --out "$OUT/step.jsonl" 2>&1 | f3 ) &
  ( export CUDA_VISIBLE_DEVICES=1; timeout 300 bash -c "python3 benchmarks/bench_fork_e2e.py --size 1024 --steps 20 \
      --tag 1gpu --out $OUT/e2e.jsonl; python3 benchmarks/profile_flux_step.py --sizes 1024 \
      --out $OUT/profile.jsonl" 2>&1 | f3 ) &
  ( export CUDA_VISIBLE_DEVICES=2,3; timeout 300 bash -c "torchrun --nproc_per_node=2 --master_port 29613 \
      benchmarks/profile_flux_step.py --sizes 1024 --config u2 --graph --out $OUT/profile.jsonl; \
      torchrun --nproc_per_node=2 --master_port 29614 benchmarks/bench_flux_step.py --sizes 1024 2048 --graph \
      --configs u2 --out $OUT/step.jsonl" 2>&1 | f3 ) &
  wait
  # B: the fork path on 4 GPUs after the graph-key fix, then Ulysses-4 profiles (graph, eager)
  timeout 150 torchrun --nproc_per_node=4 benchmarks/bench_fork_e2e.py --size 1024 --steps 20 --tag auto4 \
    --reference /tmp/taco-bench/1gpu-rank0/output/bench_00002_.png --out "$OUT/e2e.jsonl" 2>&1 | f3
  timeout 80 torchrun --nproc_per_node=4 benchmarks/profile_flux_step.py --sizes 1024 --config u4 --graph \
    --out "$OUT/profile.jsonl" 2>&1 | f3
  timeout 80 torchrun --nproc_per_node=4 benchmarks/profile_flux_step.py --sizes 1024 --config u4 \
    --out "$OUT/profile.jsonl" 2>&1 | f3
fi
if [ "$what" = s4 ]; then
  # Flux after the GELU-epilogue / packed-qkv / fused-modulation / pipelined-Ulysses changes.
  # A (side by side): 1-GPU steps + diffusers on GPU 0; 1-GPU fork path + profile on GPU 1; 2-GPU steps and
  # profile on GPUs 2-3.  B: 4-GPU fork path, 4-GPU steps, 4-GPU profile.
  f4() { grep -E '^\{|Error|error:|Fused|disagree|refused' | grep -v Warning; }
  ( CUDA_VISIBLE_DEVICES=0 timeout 240 python3 benchmarks/bench_flux_step.py --sizes 1024 2048 --graph \
      --diffusers --out "$OUT/step.jsonl" 2>&1 | f4 ) &
  ( export CUDA_VISIBLE_DEVICES=1; timeout 240 bash -c "python3 benchmarks/bench_fork_e2e.py --size 1024 --steps 20 \
      --tag 1gpu --out $OUT/e2e.jsonl; python3 benchmarks/profile_flux_step.py --sizes 1024 2048 \
      --out $OUT/profile.jsonl" 2>&1 | f4 ) &
  ( export CUDA_VISIBLE_DEVICES=2,3; timeout 240 bash -c "torchrun --nproc_per_node=2 --master_port 29615 \
      benchmarks/bench_flux_step.py --sizes 1024 2048 --graph --configs u2 --out $OUT/step.jsonl; \
      torchrun --nproc_per_node=2 --master_port 29616 benchmarks/profile_flux_step.py --sizes 1024 --config u2 \
      --graph --out $OUT/profile.jsonl" 2>&1 | f4 ) &
  wait
  timeout 120 torchrun --nproc_per_node=4 benchmarks/bench_fork_e2e.py --size 1024 --steps 20 --tag auto4 \
    --reference /tmp/taco-bench/1gpu-rank0/output/bench_00002_.png --out "$OUT/e2e.jsonl" 2>&1 | f4
  timeout 100 torchrun --nproc_per_node=4 benchmarks/bench_flux_step.py --sizes 1024 2048 --graph --configs u4 \
    --out "$OUT/step.jsonl" 2>&1 | f4
  TACO_ULYSSES_CHUNKS=1 timeout 60 torchrun --nproc_per_node=4 benchmarks/bench_flux_step.py --sizes 1024 --graph \
    --configs u4 --out "$OUT/step_chunks1.jsonl" 2>&1 | f4
  timeout 60 torchrun --nproc_per_node=4 benchmarks/profile_flux_step.py --sizes 1024 --config u4 --graph \
    --out "$OUT/profile.jsonl" 2>&1 | f4
fi
if [ "$what" = s5 ]; then
  # Wan 2.1 14B: 1 GPU (ours, diffusers), then Ulysses 4 with the head-group pipelining on (2) and off (1),
  # then a Ulysses-4 profile
  f5() { grep -E '^\{|Error|error:|Fused|disagree|refused' | grep -v Warning; }
  CUDA_VISIBLE_DEVICES=0 timeout 200 python3 benchmarks/bench_wan_step.py --diffusers --out "$OUT/wan_step.jsonl" 2>&1 | f5
  TACO_ULYSSES_CHUNKS=2 timeout 100 torchrun --nproc_per_node=4 benchmarks/bench_wan_step.py --configs u4 \
    --out "$OUT/wan_step.jsonl" 2>&1 | f5
  TACO_ULYSSES_CHUNKS=1 timeout 100 torchrun --nproc_per_node=4 benchmarks/bench_wan_step.py --configs u4 \
    --out "$OUT/wan_step_chunks1.jsonl" 2>&1 | f5
  timeout 80 torchrun --nproc_per_node=4 benchmarks/profile_flux_step.py --model wan --config u4 \
    --out "$OUT/profile.jsonl" 2>&1 | f5
fi
if [ "$what" = s6 ]; then
  # NCCL all-to-all bandwidth at Ulysses' message sizes under a few NCCL settings, on 4 and 2 GPUs;
  # then Flux 1024² Ulysses 4 and 2 with the head-group pipelining off (TACO_ULYSSES_CHUNKS=1)
  f6() { grep -E '^\{|Error|error:' | grep -v Warning; }
  for setting in "default" "NCCL_PROTO=Simple" "NCCL_MIN_NCHANNELS=32" "NCCL_MIN_P2P_NCHANNELS=32" \
                 "NCCL_P2P_USE_CUDA_MEMCPY=1"; do
    if [ "$setting" = default ]; then envs=(); else envs=("$setting"); fi
    env "${envs[@]}" timeout 40 torchrun --nproc_per_node=4 benchmarks/probe_alltoall.py --tag "$setting" \
      --out "$OUT/alltoall.jsonl" 2>&1 | f6
  done
  CUDA_VISIBLE_DEVICES=0,1 timeout 40 torchrun --nproc_per_node=2 benchmarks/probe_alltoall.py --tag default2 \
    --out "$OUT/alltoall.jsonl" 2>&1 | f6
  CUDA_VISIBLE_DEVICES=0 timeout 80 python3 benchmarks/bench_flux_step.py --sizes 1024 2048 --graph \
    --out "$OUT/step.jsonl" 2>&1 | f6
  TACO_ULYSSES_CHUNKS=1 timeout 100 torchrun --nproc_per_node=4 benchmarks/bench_flux_step.py --sizes 1024 2048 \
    --graph --configs u4 --out "$OUT/step.jsonl" 2>&1 | f6
fi
if [ "$what" = s7 ]; then
  # the single blocks' MLP overlapped with the Ulysses exchanges (TACO_SP_OVERLAP=1, default) vs not (0):
  # 1-GPU baseline on GPU 2 while Ulysses 2 runs on GPUs 0-1, then Ulysses 4 with and without the overlap
  f7() { grep -E '^\{|Error|error:|Fused|disagree' | grep -v Warning; }
  ( CUDA_VISIBLE_DEVICES=2 timeout 80 python3 benchmarks/bench_flux_step.py --sizes 1024 --graph \
      --out "$OUT/step.jsonl" 2>&1 | f7 ) &
  ( CUDA_VISIBLE_DEVICES=0,1 timeout 80 torchrun --nproc_per_node=2 --master_port 29617 benchmarks/bench_flux_step.py \
      --sizes 1024 --graph --configs u2 --out "$OUT/step.jsonl" 2>&1 | f7 ) &
  wait
  timeout 70 torchrun --nproc_per_node=4 benchmarks/bench_flux_step.py --sizes 1024 --graph --configs u4 \
    --out "$OUT/step.jsonl" 2>&1 | f7
  TACO_SP_OVERLAP=0 timeout 70 torchrun --nproc_per_node=4 benchmarks/bench_flux_step.py --sizes 1024 --graph \
    --configs u4 --out "$OUT/step_no_overlap.jsonl" 2>&1 | f7
fi
if [ "$what" = next ]; then
  # for the next session: symmetric-memory all-to-all vs NCCL (correctness + bandwidth), then the fork path
  # on 1, 4 and 2 GPUs with the current code
  fn() { grep -E '^\{|Error|error:|Fused|disagree' | grep -v Warning; }
  timeout 40 torchrun --nproc_per_node=4 benchmarks/probe_alltoall.py --tag nccl4 --out "$OUT/alltoall.jsonl" 2>&1 | fn
  timeout 40 torchrun --nproc_per_node=4 benchmarks/probe_alltoall.py --transport symm --tag symm4 \
    --out "$OUT/alltoall.jsonl" 2>&1 | fn
  CUDA_VISIBLE_DEVICES=0,1 timeout 40 torchrun --nproc_per_node=2 benchmarks/probe_alltoall.py --transport symm \
    --tag symm2 --out "$OUT/alltoall.jsonl" 2>&1 | fn
  CUDA_VISIBLE_DEVICES=0 timeout 90 python3 benchmarks/bench_fork_e2e.py --size 1024 --steps 20 --tag 1gpu \
    --out "$OUT/e2e.jsonl" 2>&1 | fn
  fork_ngpu 4 120 | fn
  fork_ngpu 2 100 | fn
fi
if [ "$what" = s8 ]; then
  # all-to-all transports (NCCL, symmetric memory by SM copies, by copy engines) on 4 and 2 GPUs, with a
  # guided Wan 14B step on one GPU (batch of 2 and two batches of 1) alongside the 2-GPU probes; then the
  # guided Wan step on 4 GPUs: CFG parallel 2 x Ulysses 2 (the automatic plan at cfg != 1) and Ulysses 4
  f8() { grep -E '^\{|Error|error:|Fused|disagree' | grep -v Warning; }
  for tr in nccl symm symm_ce; do
    timeout 45 torchrun --nproc_per_node=4 benchmarks/probe_alltoall.py --transport $tr --tag ${tr}4 \
      --out "$OUT/alltoall.jsonl" 2>&1 | f8
  done
  ( CUDA_VISIBLE_DEVICES=0 timeout 240 python3 benchmarks/bench_wan_step.py --cfg --out "$OUT/wan_cfg_step.jsonl" 2>&1 | f8 ) &
  ( export CUDA_VISIBLE_DEVICES=2,3; for tr in nccl symm symm_ce; do
      timeout 45 torchrun --nproc_per_node=2 --master_port 29618 benchmarks/probe_alltoall.py --transport $tr \
        --tag ${tr}2 --out "$OUT/alltoall.jsonl" 2>&1 | f8; done ) &
  wait
  timeout 200 torchrun --nproc_per_node=4 benchmarks/bench_wan_step.py --cfg --configs c2u2 u4 \
    --out "$OUT/wan_cfg_step.jsonl" 2>&1 | f8
fi
if [ "$what" = s9 ]; then
  # Ulysses over NCCL's all-to-all (TACO_A2A=nccl) vs direct NVLink writes (symm), same machine and call.
  # A (side by side): 1-GPU Flux steps on GPU 0; the 1-GPU fork path on GPU 1; Ulysses 2 steps with each
  # transport and a Ulysses-2 Wan profile on GPUs 2-3.  B: Flux Ulysses 4 and the guided Wan step (CFG 2 x
  # Ulysses 2) with each transport, then the 4-GPU fork path.
  f9() { grep -E '^\{|Error|error:|Fused|disagree|refused|capture' | grep -v Warning; }
  ( CUDA_VISIBLE_DEVICES=0 timeout 150 python3 benchmarks/bench_flux_step.py --sizes 1024 2048 --graph \
      --out "$OUT/step.jsonl" 2>&1 | f9 ) &
  ( CUDA_VISIBLE_DEVICES=1 timeout 150 python3 benchmarks/bench_fork_e2e.py --size 1024 --steps 20 --tag 1gpu \
      --out "$OUT/e2e.jsonl" 2>&1 | f9 ) &
  ( export CUDA_VISIBLE_DEVICES=2,3; for tr in nccl symm; do
      TACO_A2A=$tr timeout 70 torchrun --nproc_per_node=2 --master_port 29619 benchmarks/bench_flux_step.py \
        --sizes 1024 --graph --configs u2 --out "$OUT/step_$tr.jsonl" 2>&1 | f9; done
    timeout 90 torchrun --nproc_per_node=2 --master_port 29620 benchmarks/profile_flux_step.py --model wan \
      --config u2 --out "$OUT/profile.jsonl" 2>&1 | f9 ) &
  wait
  for tr in nccl symm; do
    TACO_A2A=$tr timeout 80 torchrun --nproc_per_node=4 benchmarks/bench_flux_step.py --sizes 1024 2048 --graph \
      --configs u4 --out "$OUT/step_$tr.jsonl" 2>&1 | f9
  done
  for tr in nccl symm; do
    TACO_A2A=$tr timeout 80 torchrun --nproc_per_node=4 benchmarks/bench_wan_step.py --cfg --configs c2u2 \
      --out "$OUT/wan_cfg_step_$tr.jsonl" 2>&1 | f9
  done
  fork_ngpu 4 100 | f9
fi
if [ "$what" = s10 ]; then
  # symmetric-memory exchanges with the single blocks' copies on copy engines behind the MLP (TACO_A2A=symm)
  # vs NCCL, each with its 1-GPU baseline in this call. A (side by side): 1-GPU Flux steps on GPU 0; the
  # guided 1-GPU Wan step on GPU 1; Ulysses 2 with each transport on GPUs 2-3.  B: Flux Ulysses 4 and the
  # guided Wan step under CFG 2 x Ulysses 2, each transport (full logs of the Wan runs in $OUT).
  f10() { grep -E '^\{|Error|error:|Fused|disagree|refused|capture' | grep -v Warning; }
  ( CUDA_VISIBLE_DEVICES=0 timeout 150 python3 benchmarks/bench_flux_step.py --sizes 1024 2048 --graph \
      --out "$OUT/step.jsonl" 2>&1 | f10 ) &
  ( CUDA_VISIBLE_DEVICES=1 timeout 200 python3 benchmarks/bench_wan_step.py --cfg --out "$OUT/wan_cfg_step.jsonl" \
      2>&1 | f10 ) &
  ( export CUDA_VISIBLE_DEVICES=2,3; for tr in nccl symm; do
      TACO_A2A=$tr timeout 70 torchrun --nproc_per_node=2 --master_port 29621 benchmarks/bench_flux_step.py \
        --sizes 1024 --graph --configs u2 --out "$OUT/step_$tr.jsonl" 2>&1 | f10; done ) &
  wait
  for tr in symm nccl; do
    TACO_A2A=$tr timeout 80 torchrun --nproc_per_node=4 benchmarks/bench_flux_step.py --sizes 1024 2048 --graph \
      --configs u4 --out "$OUT/step_$tr.jsonl" 2>&1 | f10
  done
  for tr in symm nccl; do
    TACO_A2A=$tr timeout 150 torchrun --nproc_per_node=4 benchmarks/bench_wan_step.py --cfg --configs c2u2 \
      --out "$OUT/wan_cfg_step_$tr.jsonl" > "$OUT/wan_$tr.log" 2>&1; echo "wan $tr rc=$?"; f10 < "$OUT/wan_$tr.log"
  done
fi
if [ "$what" = s11 ]; then
  # the fork path with the automatic transport (symmetric memory for Ulysses over the whole host) on 1, 4 and
  # 2 GPUs, with 1-GPU steps and a Ulysses-2 CUDA-graph profile alongside the 1-GPU run
  f11() { grep -E '^\{|Error|error:|Fused|disagree|refused|capture|Sampling:' | grep -v Warning; }
  ( CUDA_VISIBLE_DEVICES=0 timeout 100 python3 benchmarks/bench_flux_step.py --sizes 1024 --graph \
      --out "$OUT/step.jsonl" 2>&1 | f11 ) &
  ( CUDA_VISIBLE_DEVICES=1 timeout 120 python3 benchmarks/bench_fork_e2e.py --size 1024 --steps 20 --tag 1gpu \
      --out "$OUT/e2e.jsonl" 2>&1 | f11 ) &
  ( export CUDA_VISIBLE_DEVICES=2,3; timeout 120 torchrun --nproc_per_node=2 --master_port 29622 \
      benchmarks/profile_flux_step.py --sizes 1024 --config u2 --graph --out "$OUT/profile.jsonl" > "$OUT/profile_u2.log" 2>&1 ) &
  wait
  fork_ngpu 4 120 | f11
  fork_ngpu 2 100 | f11
fi
if [ "$what" = s12 ]; then
  # the fork path on 4 and 2 GPUs with symmetric memory: do the processes exit once the symmetric buffers are
  # released before destroy_process_group? (rc 124 = still hanging at the timeout)
  f12() { grep -E '^\{|Error|error:|refused|capture' | grep -v Warning; }
  for n in 4 2; do
    t0=$(date +%s)
    timeout 110 torchrun --nproc_per_node=$n benchmarks/bench_fork_e2e.py --size 1024 --steps 20 --tag exit$n \
      --out "$OUT/e2e.jsonl" 2>&1 | f12
    echo "{\"exit_check\": $n, \"rc\": ${PIPESTATUS[0]}, \"wall_s\": $(( $(date +%s) - t0 ))}"
  done
fi
if [ "$what" = s13 ]; then
  # for the next session: (1) where symmetric memory hangs on sub-groups, step by step, with and without a
  # world rendezvous first; (2) does the fork path on 4 GPUs now exit (bounded teardown + os._exit)?
  # (3) Wan Ulysses 4 with symmetric memory forced (the unpacked q/k/v path, never run on GPUs yet)
  f13() { grep -E '^\{|^rank|Error|error:|refused|capture' | grep -v Warning; }
  timeout 60 torchrun --nproc_per_node=4 benchmarks/probe_symm_subgroups.py 2>&1 | f13
  timeout 60 torchrun --nproc_per_node=4 benchmarks/probe_symm_subgroups.py --world-first 2>&1 | f13
  t0=$(date +%s)
  timeout 110 torchrun --nproc_per_node=4 benchmarks/bench_fork_e2e.py --size 1024 --steps 20 --tag exit4 \
    --out "$OUT/e2e.jsonl" 2>&1 | f13
  echo "{\"exit_check\": 4, \"rc\": ${PIPESTATUS[0]}, \"wall_s\": $(( $(date +%s) - t0 ))}"
  TACO_A2A=symm timeout 150 torchrun --nproc_per_node=4 benchmarks/bench_wan_step.py --configs u4 \
    --out "$OUT/wan_step_symm.jsonl" 2>&1 | f13
fi
if [ "$what" = s14 ]; then
  # fifth session, Flux: double blocks' modulation as side work of the attention (their exchanges on copy
  # engines behind it), against TACO_SP_OVERLAP=0 (no side work) and the 1-GPU baselines of this call.
  # A (side by side): 1-GPU steps on GPU 0, the 1-GPU fork path on GPU 1, Ulysses 2 on GPUs 2-3.
  # B: Ulysses 4 (and with two head groups on symmetric memory), the 4-GPU fork path (rc: does it exit?).
  # C: where symmetric memory hangs on sub-groups.
  f14() { grep -E '^\{|^rank|Error|error:|refused|capture|Sampling:' | grep -v Warning; }
  ( flux_steps_1gpu 1024 | f14 ) &
  ( fork_1gpu | f14 ) &
  ( export CUDA_VISIBLE_DEVICES=2,3; for ov in 1 0; do
      TACO_SP_OVERLAP=$ov timeout 65 torchrun --nproc_per_node=2 --master_port 29623 benchmarks/bench_flux_step.py \
        --sizes 1024 --graph --configs u2 --out "$OUT/step_overlap$ov.jsonl" 2>&1 | f14; done ) &
  wait
  timeout 75 torchrun --nproc_per_node=4 benchmarks/bench_flux_step.py --sizes 1024 --graph --configs u4 \
    --out "$OUT/step_overlap1.jsonl" 2>&1 | f14
  TACO_A2A=symm TACO_ULYSSES_CHUNKS=2 timeout 75 torchrun --nproc_per_node=4 benchmarks/bench_flux_step.py \
    --sizes 1024 --graph --configs u4 --out "$OUT/step_chunks2.jsonl" 2>&1 | f14
  t0=$(date +%s)
  fork_ngpu 4 | f14
  echo "{\"exit_check\": 4, \"rc\": ${PIPESTATUS[0]}, \"wall_s\": $(( $(date +%s) - t0 ))}"
  timeout 50 torchrun --nproc_per_node=4 benchmarks/probe_symm_subgroups.py 2>&1 | f14
fi
if [ "$what" = s15 ]; then
  # fifth session, Wan 14B guided step: k and v deferred (computed while q's exchange is in flight) under
  # CFG 2 x Ulysses 2, against TACO_SP_OVERLAP=0 (the previous path) and the 1-GPU baseline of this call;
  # alongside the baseline, where the VAE decode and the PNG save of the fork path go (GPU 3); then a
  # Flux Ulysses-4 profile with the double blocks' modulation as side work
  f15() { grep -E '^\{|Error|error:|refused|capture' | grep -v Warning; }
  ( CUDA_VISIBLE_DEVICES=0 timeout 200 python3 benchmarks/bench_wan_step.py --cfg --out "$OUT/wan_cfg_step.jsonl" \
      2>&1 | f15 ) &
  ( CUDA_VISIBLE_DEVICES=3 timeout 150 python3 benchmarks/bench_vae_decode.py --out "$OUT/vae.jsonl" 2>&1 | f15 ) &
  wait
  for ov in 1 0; do
    TACO_SP_OVERLAP=$ov timeout 150 torchrun --nproc_per_node=4 benchmarks/bench_wan_step.py --cfg --configs c2u2 \
      --out "$OUT/wan_cfg_step_overlap$ov.jsonl" > "$OUT/wan_$ov.log" 2>&1; echo "wan overlap=$ov rc=$?"; f15 < "$OUT/wan_$ov.log"
    [ $ov = 1 ] && timeout 80 torchrun --nproc_per_node=4 benchmarks/profile_flux_step.py --sizes 1024 --config u4 \
      --graph --out "$OUT/profile.jsonl" > "$OUT/profile_u4.log" 2>&1
  done
fi
if [ "$what" = s16 ]; then
  # fifth session: symmetric-memory copies to each peer on their own copy-engine stream; the VAE decode's
  # image scaled on the GPU. A (side by side): 1-GPU steps (GPU 0), the 1-GPU fork path (GPU 1), the VAE
  # decode bench (GPU 2), the PNG writer's thread scaling on this host's CPUs. B: Ulysses 4 steps (and with
  # no side work, TACO_SP_OVERLAP=0), the 4-GPU fork path against the 1-GPU PNG.
  f16() { grep -E '^\{|Error|error:|refused|capture|Sampling:|cpu_count|level|noise|smooth' | grep -v Warning; }
  ( flux_steps_1gpu 1024 | f16 ) &
  ( fork_1gpu | f16 ) &
  ( CUDA_VISIBLE_DEVICES=2 timeout 120 python3 benchmarks/bench_vae_decode.py --out "$OUT/vae.jsonl" 2>&1 | f16 ) &
  ( timeout 120 python3 benchmarks/bench_png_writer.py --repeat 5 > "$OUT/png_writer.txt" 2>&1 ) &
  wait
  for ov in 1 0; do
    TACO_SP_OVERLAP=$ov timeout 75 torchrun --nproc_per_node=4 benchmarks/bench_flux_step.py --sizes 1024 --graph \
      --configs u4 --out "$OUT/step_overlap$ov.jsonl" 2>&1 | f16
  done
  fork_ngpu 4 | f16
  cat "$OUT/png_writer.txt"
fi
if [ "$what" = s17 ]; then
  # fifth session: Flux's packed q/k/v sent by 2-D memcpys straight from the packed buffer (no contiguous
  # copy first), against TACO_CE_2D=0. A (side by side): 1-GPU steps at 1024² and 2048² (GPU 0), the 1-GPU
  # fork path (GPU 1), Ulysses 2 with and without (GPUs 2-3). B: Ulysses 4 at both sizes, without at 1024²,
  # the 4-GPU fork path against the 1-GPU PNG.
  f17() { grep -E '^\{|Error|error:|refused|capture|Sampling:' | grep -v Warning; }
  ( flux_steps_1gpu 1024 2048 | f17 ) &
  ( fork_1gpu | f17 ) &
  ( export CUDA_VISIBLE_DEVICES=2,3; for c2 in 1 0; do
      TACO_CE_2D=$c2 timeout 65 torchrun --nproc_per_node=2 --master_port 29625 benchmarks/bench_flux_step.py \
        --sizes 1024 --graph --configs u2 --out "$OUT/step_ce2d$c2.jsonl" 2>&1 | f17; done ) &
  wait
  timeout 120 torchrun --nproc_per_node=4 benchmarks/bench_flux_step.py --sizes 1024 2048 --graph --configs u4 \
    --out "$OUT/step_ce2d1.jsonl" 2>&1 | f17
  TACO_CE_2D=0 timeout 75 torchrun --nproc_per_node=4 benchmarks/bench_flux_step.py --sizes 1024 --graph \
    --configs u4 --out "$OUT/step_ce2d0.jsonl" 2>&1 | f17
  fork_ngpu 4 | f17
fi
if [ "$what" = s18 ] || [ "$what" = s20 ]; then
  # fifth session: the fork path once more (end-to-end ratio), 1 GPU then 4 and 2 GPUs, with 1-GPU steps
  # beside (s20: the same, after SaveImage's PNG encode was shared by the ranks)
  f18() { grep -E '^\{|Error|error:|refused|capture|Sampling:' | grep -v Warning; }
  ( flux_steps_1gpu 1024 | f18 ) &
  ( fork_1gpu | f18 ) &
  wait
  fork_ngpu 4 | f18
  fork_ngpu 2 | f18
fi
if [ "$what" = s19 ]; then
  # fifth session: Wan 14B guided step under CFG 2 x Ulysses 2 with symmetric memory on each Ulysses pair
  # (TACO_A2A=symm: q, k, v and the output by copy engine, 2-D memcpys straight from the projections), with
  # the 1-GPU baseline of this call; beside it, the PNG writer's thread scaling on this host's CPUs
  f19() { grep -E '^\{|Error|error:|refused|capture|hang|Traceback' | grep -v Warning; }
  ( CUDA_VISIBLE_DEVICES=0 timeout 200 python3 benchmarks/bench_wan_step.py --cfg --out "$OUT/wan_cfg_step.jsonl" \
      2>&1 | f19 ) &
  ( sleep 60; timeout 100 python3 benchmarks/bench_png_writer.py --repeat 7 > "$OUT/png_writer.txt" 2>&1 ) &
  wait
  TACO_A2A=symm timeout 170 torchrun --nproc_per_node=4 benchmarks/bench_wan_step.py --cfg --configs c2u2 \
    --out "$OUT/wan_cfg_step_symm.jsonl" > "$OUT/wan_symm.log" 2>&1; echo "wan symm rc=$?"; f19 < "$OUT/wan_symm.log"
  head -12 "$OUT/png_writer.txt"
fi
if [ "$what" = s21 ]; then
  # prepared for the next session: where the 2-GPU Flux step goes now (2-D memcpy exchanges, double-block side
  # work), beside a 1-GPU profile, then the 4-GPU profile; raw logs in $OUT
  ( CUDA_VISIBLE_DEVICES=0 timeout 100 python3 benchmarks/profile_flux_step.py --sizes 1024 \
      --out "$OUT/profile.jsonl" > "$OUT/profile_1gpu.log" 2>&1 ) &
  ( export CUDA_VISIBLE_DEVICES=2,3; timeout 100 torchrun --nproc_per_node=2 --master_port 29626 \
      benchmarks/profile_flux_step.py --sizes 1024 --config u2 --graph --out "$OUT/profile.jsonl" \
      > "$OUT/profile_u2.log" 2>&1 ) &
  wait
  timeout 100 torchrun --nproc_per_node=4 benchmarks/profile_flux_step.py --sizes 1024 --config u4 --graph \
    --out "$OUT/profile.jsonl" > "$OUT/profile_u4.log" 2>&1
  grep -h '^{' "$OUT/profile.jsonl" | cut -c1-400
fi
if [ "$what" = s22 ]; then
  # prepared for the next session: the VAE decode with the GroupNorm statistics pass (TACO_VAE_FAST_GN=1)
  # against torch's GroupNorm, then the fork path on 1 and 4 GPUs with it
  f22() { grep -E '^\{|Error|error:|Sampling:' | grep -v Warning; }
  ( CUDA_VISIBLE_DEVICES=0 timeout 120 python3 benchmarks/bench_vae_decode.py --out "$OUT/vae.jsonl" 2>&1 | f22 ) &
  ( TACO_VAE_FAST_GN=1 fork_1gpu | f22 ) &
  wait
  TACO_VAE_FAST_GN=1 fork_ngpu 4 | f22
fi
if [ "$what" = s23 ]; then
  # sixth session: sub-group exchanges on the world's symmetric arena (exchange.ArenaExchange). The probe checks
  # them against NCCL on the pairs of CFG 2 x Ulysses 2 and times one exchange; then the Wan guided step:
  # 1-GPU baseline, CFG 2 x Ulysses 2 with the arena (TACO_A2A=symm), and with NCCL
  f23() { grep -E '^\{|Error|error:|refused|equals|hang|Traceback' | grep -v Warning; }
  timeout 60 torchrun --nproc_per_node=4 benchmarks/probe_symm_arena.py > "$OUT/probe_arena.log" 2>&1
  echo "probe rc=$?"; f23 < "$OUT/probe_arena.log" | grep -E '^\{|rank 0|Error|differs'
  CUDA_VISIBLE_DEVICES=0 timeout 200 python3 benchmarks/bench_wan_step.py --cfg --out "$OUT/wan_cfg_step.jsonl" 2>&1 | f23
  if grep -q "done" "$OUT/probe_arena.log"; then
    TACO_A2A=symm timeout 160 torchrun --nproc_per_node=4 benchmarks/bench_wan_step.py --cfg --configs c2u2 \
      --out "$OUT/wan_cfg_step_arena.jsonl" > "$OUT/wan_arena.log" 2>&1; echo "wan arena rc=$?"; f23 < "$OUT/wan_arena.log"
  fi
  timeout 130 torchrun --nproc_per_node=4 benchmarks/bench_wan_step.py --cfg --configs c2u2 \
    --out "$OUT/wan_cfg_step_nccl.jsonl" 2>&1 | f23
fi
if [ "$what" = s24 ]; then
  # sixth session: the Wan guided step with the arena by default (automatic transport) and the cross-attention's
  # k/v as side work, against this call's 1-GPU baseline (call s23 had NCCL's A/B); beside it, the 1-GPU fork
  # path; then 4 GPUs (VAE GroupNorm statistics pass on by default). Head groups and TunableOp were left out
  # after call s27 (2 GPUs) measured both slower.
  f24() { grep -E '^\{|Error|error:|refused|Sampling:|Traceback' | grep -v Warning; }
  ( CUDA_VISIBLE_DEVICES=0 timeout 200 python3 benchmarks/bench_wan_step.py --cfg --out "$OUT/wan_cfg_step.jsonl" \
      2>&1 | f24 ) &
  [ -n "${S24_NO_FORK:-}" ] || ( fork_1gpu | f24 ) &
  wait
  timeout 130 torchrun --nproc_per_node=4 benchmarks/bench_wan_step.py --cfg --configs c2u2 \
    --out "$OUT/wan_cfg_step_c2u2.jsonl" 2>&1 | f24
  [ -n "${S24_NO_FORK:-}" ] || fork_ngpu 4 | f24
fi
if [ "$what" = s25 ]; then
  # sixth session, on 2 GPUs: where the Wan 14B forward goes on 1 GPU and per rank under Ulysses 2 with
  # symmetric memory (copy-engine copies, k/v deferred, the cross-attention's k/v as side work)
  # (the first such call hung under Ulysses 2 with a rendezvous per exchange; the staged exchanges now always
  # take the world's arena. S25_U2_ONLY=1 skips the 1-GPU profile)
  [ -n "${S25_U2_ONLY:-}" ] || { CUDA_VISIBLE_DEVICES=0 timeout 170 python3 benchmarks/profile_flux_step.py \
    --model wan --top 40 --out "$OUT/profile.jsonl" > "$OUT/profile_wan_1gpu.log" 2>&1; echo "1gpu rc=$?"; }
  TACO_A2A=symm timeout 170 torchrun --nproc_per_node=2 benchmarks/profile_flux_step.py --model wan --config u2 \
    --top 40 --out "$OUT/profile.jsonl" > "$OUT/profile_wan_u2.log" 2>&1; echo "u2 rc=$?"
  grep -h '^{' "$OUT/profile.jsonl" | cut -c1-600
fi
if [ "$what" = s26 ]; then
  # sixth session, on 2 GPUs: Flux 1024² steps with and without TunableOp (TACO_TUNE_GEMM=1), 1 GPU (both GPUs at
  # once, one setting each) and Ulysses 2, CUDA graphs
  f26() { grep -E '^\{|Error|error:|Traceback' | grep -v Warning; }
  ( CUDA_VISIBLE_DEVICES=0 timeout 150 python3 benchmarks/bench_flux_step.py --sizes 1024 --graph \
      --out "$OUT/step.jsonl" 2>&1 | f26 ) &
  ( CUDA_VISIBLE_DEVICES=1 TACO_TUNE_GEMM=1 timeout 150 python3 benchmarks/bench_flux_step.py --sizes 1024 --graph \
      --out "$OUT/step_tuned.jsonl" 2>&1 | f26 ) &
  wait
  timeout 100 torchrun --nproc_per_node=2 benchmarks/bench_flux_step.py --sizes 1024 --graph --configs u2 \
    --out "$OUT/step_u2.jsonl" 2>&1 | f26
  TACO_TUNE_GEMM=1 timeout 120 torchrun --nproc_per_node=2 benchmarks/bench_flux_step.py --sizes 1024 --graph \
    --configs u2 --out "$OUT/step_u2_tuned.jsonl" 2>&1 | f26
fi
if [ "$what" = s27 ]; then
  # sixth session, on 2 GPUs: one Wan 14B forward under Ulysses 2, A/B of the staged exchanges' options:
  # NCCL, symmetric memory (the arena), + two head groups, + TunableOp
  f27() { grep -E '^\{|Error|error:|Traceback' | grep -v Warning; }
  for v in "TACO_A2A=nccl" "TACO_A2A=symm" "TACO_A2A=symm TACO_ULYSSES_CHUNKS=2" "TACO_A2A=symm TACO_TUNE_GEMM=1"; do
    echo "== $v"
    env $v timeout 110 torchrun --nproc_per_node=2 benchmarks/bench_wan_step.py --configs u2 \
      --out "$OUT/wan_u2.jsonl" 2>&1 | f27
  done
fi
if [ "$what" = s29 ]; then
  # seventh session: the transformer GEMMs of Wan 14B and Flux at the per-rank token counts of 1, 2 and 4 GPUs and
  # nearby multiples of 8 / 64 / 128 (does cuBLAS's choice at 16380 rows cost Ulysses 2 its matmul time?), 1 GPU
  CUDA_VISIBLE_DEVICES=0 timeout 150 python3 benchmarks/probe_gemm_rows.py --out "$OUT/gemm_rows.jsonl" 2>&1 \
    | grep -E '^\{|Error|error:|Traceback' | grep -v Warning
fi
if [ "$what" = s30 ]; then
  # seventh session: Flux 1024² on 2 GPUs, Ring 2 with the keys gathered in one exchange (sp_attention.ring_gathered)
  # against Ulysses 2, CUDA graphs; NCCL and symmetric memory (copy engines); the 1-GPU baseline beside them on GPU 2
  flux_1024_beside_2gpu u2 r2
  CUDA_VISIBLE_DEVICES=0,1 TACO_A2A=symm timeout 160 torchrun --nproc_per_node=2 benchmarks/bench_flux_step.py \
    --sizes 1024 --graph --configs r2 --out "$OUT/step_2gpu_symm.jsonl" 2>&1 | fj
  wait
fi
if [ "$what" = s31 ]; then
  # seventh session: where a Flux 1024² step goes on 2 GPUs, Ring 2 with gathered keys (symmetric memory) and Ulysses
  # 2 (automatic), CUDA graphs, one profile per rank
  for c in r2 u2; do
    a2a=auto; [ "$c" = r2 ] && a2a=symm
    CUDA_VISIBLE_DEVICES=0,1 TACO_A2A=$a2a timeout 170 torchrun --nproc_per_node=2 benchmarks/profile_flux_step.py \
      --sizes 1024 --config $c --graph --top 40 --out "$OUT/profile.jsonl" > "$OUT/profile_$c.log" 2>&1; echo "$c rc=$?"
  done
  grep -h '^{' "$OUT/profile.jsonl" | cut -c1-400
fi
if [ "$what" = s32 ]; then
  # seventh session: as s30 with the gathered ring's q/k/v written in place (automatic transport: symmetric memory)
  flux_1024_beside_2gpu r2 u2
  wait
fi
if [ "$what" = s33 ]; then
  # seventh session: the full fork path, Flux 1024² 20 steps, on 1 GPU and on 2 GPUs with the automatic plan (now ring
  # 2 with the keys gathered in place) and with Ulysses 2 asked for (--config u2)
  f33() { grep -E '^\{|Error|error:|refused|Sampling:|TACO-DiT plan|Traceback' | grep -v Warning; }
  fork_1gpu | f33
  fork_ngpu 2 | f33
  timeout 110 torchrun --nproc_per_node=2 benchmarks/bench_fork_e2e.py --size 1024 --steps 20 --tag u2 --config u2 \
    --reference /tmp/taco-bench/1gpu-rank0/output/bench_00002_.png --out "$OUT/e2e.jsonl" 2>&1 | f33
fi
if [ "$what" = s34 ]; then
  # seventh session, on 2 GPUs: Flux steps at 1024² and 2048², 1 GPU, then ring 2 (gathered in place, the automatic
  # choice on 2 ranks) against Ulysses 2; then ring 2 at 1024² with each peer copy split over two copy-engine
  # streams (TACO_GATHER_LANES=2; no gain, so the split was removed after this call); CUDA graphs
  f34() { grep -E '^\{|Error|error:|Traceback' | grep -v Warning; }
  CUDA_VISIBLE_DEVICES=0 timeout 170 python3 benchmarks/bench_flux_step.py --sizes 1024 2048 --graph \
    --out "$OUT/step.jsonl" 2>&1 | f34
  timeout 200 torchrun --nproc_per_node=2 benchmarks/bench_flux_step.py --sizes 1024 2048 --graph --configs r2 u2 \
    --out "$OUT/step_2gpu.jsonl" 2>&1 | f34
  TACO_GATHER_LANES=2 timeout 120 torchrun --nproc_per_node=2 benchmarks/bench_flux_step.py --sizes 1024 --graph \
    --configs r2 --out "$OUT/step_2gpu_lanes2.jsonl" 2>&1 | f34
fi
if [ "$what" = s35 ]; then
  # seventh session, on 2 GPUs: Flux 1024², ring 2 gathered in place, with the attention on its own stream beside the
  # single blocks' MLP (TACO_RING_CONCURRENT=1) or not, in the order off, on, off, on; 1 GPU first; CUDA graphs
  # (the concurrent variant measured slower and was removed after this call)
  f35() { grep -E '^\{|Error|error:|Traceback' | grep -v Warning; }
  CUDA_VISIBLE_DEVICES=0 timeout 120 python3 benchmarks/bench_flux_step.py --sizes 1024 --graph \
    --out "$OUT/step.jsonl" 2>&1 | f35
  for c in 0 1 0 1; do
    echo "TACO_RING_CONCURRENT=$c"
    TACO_RING_CONCURRENT=$c timeout 100 torchrun --nproc_per_node=2 benchmarks/bench_flux_step.py --sizes 1024 \
      --graph --configs r2 --out "$OUT/step_2gpu_concurrent$c.jsonl" 2>&1 | f35
  done
fi
if [ "$what" = s36 ]; then
  # seventh session: the full fork path, Flux 1024² 20 steps, 1 GPU then 4 GPUs (automatic: Ulysses 4 + graph), with
  # this session's model code (packed q/k/v from attention.qkv_buffer, linear1's q/k/v written by addmm out=)
  # (rerun it to measure the row-split VAE decode with the GroupNorm statistics pass, landed after the call)
  f36() { grep -E '^\{|Error|error:|refused|Sampling:|TACO-DiT plan|Traceback' | grep -v Warning; }
  fork_1gpu | f36
  fork_ngpu 4 | f36
fi
if [ "$what" = s37 ]; then
  # eighth session, 4 GPUs: where the row-split VAE decode's time goes (bench_vae_parallel.py: 1 GPU whole vs
  # 4 ranks, statistics pass on/off, host issue time, profile, to-CPU copy, SaveImage's uint8 step); then the
  # full fork path, 1 GPU and 4 GPUs (pre-sampling split into executor -> KSampler -> first model call; the
  # SaveImage uint8 step now one torch pass)
  f37() { grep -E '^\{|Error|error:|refused|Sampling:|TACO-DiT plan|Traceback' | grep -v Warning; }
  timeout 150 torchrun --nproc_per_node=4 benchmarks/bench_vae_parallel.py --out "$OUT/vae_parallel.jsonl" 2>&1 | f37
  fork_1gpu | f37
  fork_ngpu 4 | f37
fi
if [ "$what" = s38 ]; then
  # eighth session, 2 GPUs (+ the 1-GPU baseline on GPU 2): Flux 1024², ring 2 gathered in place, with the
  # double blocks' k/v sent before q is computed (TACO_KV_EARLY=1, the default) or after (0), in the order
  # 1, 0, 1; CUDA graphs (70.94 / 70.66 / 70.63 ms: no gain, so the early send was removed after this call and
  # TACO_KV_EARLY no longer exists; rerunning this part now times the same code three times)
  ( CUDA_VISIBLE_DEVICES=2 timeout 300 python3 benchmarks/bench_flux_step.py --sizes 1024 --graph \
      --out "$OUT/step.jsonl" 2>&1 | fj ) &
  # and on GPU 3: Wan's GEMMs at 1 GPU's and Ulysses 2's rows, also with cuBLAS's m and n swapped
  ( [ "$ngpu" -ge 4 ] && CUDA_VISIBLE_DEVICES=3 timeout 200 python3 benchmarks/probe_gemm_rows.py --model wan \
      --rows 32760 16380 --orientation linear transposed transposed_copy --out "$OUT/gemm_rows.jsonl" 2>&1 | fj ) &
  for c in 1 0 1; do
    echo "TACO_KV_EARLY=$c"
    CUDA_VISIBLE_DEVICES=0,1 TACO_KV_EARLY=$c timeout 130 torchrun --nproc_per_node=2 benchmarks/bench_flux_step.py \
      --sizes 1024 --graph --configs r2 --out "$OUT/step_2gpu_early$c.jsonl" 2>&1 | fj
  done
  wait
fi
if [ "$what" = s39 ]; then
  # eighth session, 4 GPUs: the row-split VAE decode replayed as a CUDA graph (default) against eager
  # (TACO_VAE_GRAPH=0); then the fork path, 1 GPU and 4 GPUs, three runs each, the second one profiled on the
  # host (KSampler set-up, VAE.decode, SaveImage: $OUT/host_<tag>_rank<r>.txt), the third reported
  f39() { grep -E '^\{|Error|error:|refused|Sampling:|TACO-DiT plan|Traceback' | grep -v Warning; }
  TACO_VAE_GRAPH=0 timeout 120 torchrun --nproc_per_node=4 benchmarks/bench_vae_parallel.py \
    --out "$OUT/vae_parallel_eager.jsonl" 2>&1 | f39
  timeout 120 torchrun --nproc_per_node=4 benchmarks/bench_vae_parallel.py --out "$OUT/vae_parallel.jsonl" 2>&1 | f39
  CUDA_VISIBLE_DEVICES=1 timeout 130 python3 benchmarks/bench_fork_e2e.py --size 1024 --steps 20 --runs 3 \
    --profile-host --tag 1gpu --out "$OUT/e2e.jsonl" 2>&1 | f39
  timeout 130 torchrun --nproc_per_node=4 benchmarks/bench_fork_e2e.py --size 1024 --steps 20 --runs 3 \
    --profile-host --tag auto4 --reference /tmp/taco-bench/1gpu-rank0/output/bench_00003_.png \
    --out "$OUT/e2e.jsonl" 2>&1 | f39
fi
if [ "$what" = s40 ]; then
  # eighth session, 4 GPUs: the fork path, 1 GPU then 4 GPUs, twice, three runs each (the second profiled on the
  # host, the third reported), after the host-side changes that followed s39's profiles: patch_model skips
  # `.to` on a resident model and the state dict without weight patches; VAE.decode returns its one chunk
  # without a copy; SaveImage's uint8 step and the CRC on the PNG threads, 128 KiB bands. Full logs in $OUT.
  f40() { grep -E '^\{|Error|error:|refused|TACO-DiT plan' | grep -v Warning; }
  for round in 1 2; do
    CUDA_VISIBLE_DEVICES=1 timeout 130 python3 benchmarks/bench_fork_e2e.py --size 1024 --steps 20 --runs 3 \
      --profile-host --tag 1gpu --out "$OUT/e2e.jsonl" > "$OUT/fork_1gpu_$round.log" 2>&1; f40 < "$OUT/fork_1gpu_$round.log"
    timeout 130 torchrun --nproc_per_node=4 benchmarks/bench_fork_e2e.py --size 1024 --steps 20 --runs 3 \
      --profile-host --tag auto4 --reference /tmp/taco-bench/1gpu-rank0/output/bench_00003_.png \
      --out "$OUT/e2e.jsonl" > "$OUT/fork_4gpu_$round.log" 2>&1; f40 < "$OUT/fork_4gpu_$round.log"
  done
fi
if [ "$what" = s41 ]; then
  # eighth session, 4 GPUs: the fork path at 2048², 1 GPU then 4 GPUs, two runs each (the second reported):
  # the step ratio at 2048² with this session's code, and the graphed row-split VAE decode at its largest size
  f41() { grep -E '^\{|Error|error:|refused|TACO-DiT plan' | grep -v Warning; }
  CUDA_VISIBLE_DEVICES=1 timeout 200 python3 benchmarks/bench_fork_e2e.py --size 2048 --steps 20 --runs 2 \
    --tag 1gpu2k --out "$OUT/e2e.jsonl" > "$OUT/fork_1gpu_2048.log" 2>&1; f41 < "$OUT/fork_1gpu_2048.log"
  timeout 150 torchrun --nproc_per_node=4 benchmarks/bench_fork_e2e.py --size 2048 --steps 20 --runs 2 \
    --tag auto4_2k --reference /tmp/taco-bench/1gpu2k-rank0/output/bench_00002_.png \
    --out "$OUT/e2e.jsonl" > "$OUT/fork_4gpu_2048.log" 2>&1; f41 < "$OUT/fork_4gpu_2048.log"
fi
if [ "$what" = s42 ]; then
  # eighth session, 4 GPUs: the fork path at 1024², 1 GPU then 4 GPUs (three runs, the third reported), after
  # the process-group shutdown was changed to drop captured CUDA graphs first (s40 / s41: every rank waited out
  # the 20 s teardown timeout); the seconds each torchrun took are printed
  f42() { grep -E '^\{|Error|error:|refused|did not shut down' | grep -v Warning; }
  CUDA_VISIBLE_DEVICES=1 timeout 130 python3 benchmarks/bench_fork_e2e.py --size 1024 --steps 20 --runs 3 \
    --tag 1gpu --out "$OUT/e2e.jsonl" > "$OUT/fork_1gpu.log" 2>&1; f42 < "$OUT/fork_1gpu.log"
  start=$(date +%s)
  timeout 130 torchrun --nproc_per_node=4 benchmarks/bench_fork_e2e.py --size 1024 --steps 20 --runs 3 \
    --tag auto4 --reference /tmp/taco-bench/1gpu-rank0/output/bench_00003_.png \
    --out "$OUT/e2e.jsonl" > "$OUT/fork_4gpu.log" 2>&1; f42 < "$OUT/fork_4gpu.log"
  echo "4-GPU torchrun took $(( $(date +%s) - start )) s"
fi
if [ "$what" = s43 ]; then
  # eighth session: the fork path at 1024², 1 GPU then 2 GPUs (automatic: ring 2 gathered + graph; the row-split
  # VAE decode graphed over 2 ranks), three runs each, the third reported
  fork_1gpu_then_2gpu 0
fi
if [ "$what" = s44 ]; then
  # eighth session: Flux 1024² steps with the blocks' modulations computed once over the ranks and gathered
  # (TACO_SHARED_MODULATION=1, default) or on every rank (0): on 2 GPUs (ring 2 gathered, the 1-GPU baseline
  # beside on GPU 2) in the order 1, 0, 1, then on 4 GPUs (Ulysses 4) 1, 0; CUDA graphs
  flux_1gpu_bg 2 step.jsonl
  for c in 1 0 1; do flux_r2 "step_2gpu_mod$c.jsonl" TACO_SHARED_MODULATION=$c; done
  wait
  for c in 1 0; do
    echo "4 GPUs, TACO_SHARED_MODULATION=$c"
    TACO_SHARED_MODULATION=$c timeout 120 torchrun --nproc_per_node=4 benchmarks/bench_flux_step.py --sizes 1024 \
      --graph --configs u4 --out "$OUT/step_4gpu_mod$c.jsonl" 2>&1 | fj
  done
fi
if [ "$what" = s45 ]; then
  # prepared in the eighth session for the next (not run yet): where a Flux 1024² step on 2 GPUs goes now (ring 2
  # gathered in place + shared modulations, CUDA graph, one profile per rank), then the 2-GPU fork path against
  # 1 GPU with this code (three runs each, the third reported)
  CUDA_VISIBLE_DEVICES=0,1 timeout 170 torchrun --nproc_per_node=2 benchmarks/profile_flux_step.py --sizes 1024 \
    --config r2 --graph --top 40 --out "$OUT/profile.jsonl" > "$OUT/profile_r2.log" 2>&1; echo "profile rc=$?"
  grep -h '^{' "$OUT/profile.jsonl" | cut -c1-400
  fork_1gpu_then_2gpu 2
fi
if [ "$what" = s46 ]; then
  # ninth session: (1) the same fixed kernels on all four GPUs at once (is one GPU slower?); (2) the Wan 14B guided
  # step's 1-GPU baseline on GPU 0 beside a profile of the Flux 1024² step on 2 GPUs (2-3, ring 2 gathered +
  # shared modulations, CUDA graph, one profile per rank); (3) Wan on 4 GPUs: CFG 2 x Ulysses 2 (automatic)
  # against CFG 2 x ring 2 with the keys gathered, then ring 2 rotating
  for g in 0 1 2 3; do CUDA_VISIBLE_DEVICES=$g timeout 100 python3 benchmarks/probe_gpu_speed.py --tag all4 \
    --out "$OUT/gpu_speed.jsonl" > "$OUT/gpu_speed_$g.log" 2>&1 & done; wait
  python3 - "$OUT/gpu_speed.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for k in sorted({r["kernel"] for r in rows}):
    print(k, " ".join(f"gpu{r['gpu']}:{r['ms']}@{r.get('sm_mhz')}MHz/{r.get('power_w')}W" for r in rows
                      if r["kernel"] == k and r["round"] == 2))
PY
  ( CUDA_VISIBLE_DEVICES=0 timeout 240 python3 benchmarks/bench_wan_step.py --cfg --out "$OUT/wan_cfg_step.jsonl" \
      2>&1 | fj ) &
  CUDA_VISIBLE_DEVICES=2,3 timeout 200 torchrun --nproc_per_node=2 benchmarks/profile_flux_step.py --sizes 1024 \
    --config r2 --graph --top 40 --out "$OUT/profile.jsonl" > "$OUT/profile_r2.log" 2>&1; echo "profile rc=$?"
  grep -h '^{' "$OUT/profile.jsonl" | cut -c1-600
  wait
  timeout 150 torchrun --nproc_per_node=4 benchmarks/bench_wan_step.py --cfg --configs c2u2 c2r2 \
    --out "$OUT/wan_cfg_step_4gpu.jsonl" 2>&1 | fj
  TACO_RING=rotate timeout 120 torchrun --nproc_per_node=4 benchmarks/bench_wan_step.py --cfg --configs c2r2 \
    --out "$OUT/wan_cfg_step_4gpu_rotate.jsonl" 2>&1 | fj
fi
if [ "$what" = s47 ]; then
  # ninth session: Ulysses output returned into head-order slots (TACO_ULYSSES_RETURN=slots, default) against
  # blocks + interleaving copy. (1) 1-GPU baselines: the Wan 14B guided step on GPU 0, the Flux 1024² step on
  # GPU 1, beside a profile of the Flux 1024² step on 2 GPUs (2-3, ring 2 gathered) with its idle gaps;
  # (2) Wan CFG 2 x Ulysses 2 on 4 GPUs in the order slots, blocks, slots; (3) Flux Ulysses 4: blocks, slots
  ( CUDA_VISIBLE_DEVICES=0 timeout 240 python3 benchmarks/bench_wan_step.py --cfg --out "$OUT/wan_cfg_step.jsonl" \
      2>&1 | fj ) &
  ( CUDA_VISIBLE_DEVICES=1 timeout 200 python3 benchmarks/bench_flux_step.py --sizes 1024 --graph \
      --out "$OUT/step.jsonl" 2>&1 | fj ) &
  CUDA_VISIBLE_DEVICES=2,3 timeout 150 torchrun --nproc_per_node=2 benchmarks/profile_flux_step.py --sizes 1024 \
    --config r2 --graph --top 30 --out "$OUT/profile.jsonl" > "$OUT/profile_r2.log" 2>&1; echo "profile rc=$?"
  python3 - "$OUT/profile.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print("rank", r["rank"], "step", r["step_ms"], "busy", r["gpu_busy_ms"], "sm idle", r.get("sm_idle_ms"))
    for g in r.get("idle_gaps", [])[:12]:
        print("   ", g)
PY
  wait
  timeout 200 torchrun --nproc_per_node=4 benchmarks/bench_wan_step.py --cfg --configs c2u2 \
    --ulysses-return slots blocks slots --out "$OUT/wan_cfg_step_4gpu.jsonl" 2>&1 | fj
  for m in blocks slots; do
    TACO_ULYSSES_RETURN=$m timeout 100 torchrun --nproc_per_node=4 benchmarks/bench_flux_step.py --sizes 1024 \
      --graph --configs u4 --out "$OUT/step_4gpu_$m.jsonl" 2>&1 | fj
  done
fi
if [ "$what" = s48 ]; then
  # ninth session: Flux 1024² on 2 GPUs with the double blocks' k/v sent before q is computed (TACO_KV_EARLY=1,
  # default) or not (0), in the order 1, 0, 1, the 1-GPU baseline beside on GPU 2 (CUDA graphs); then the fork path
  # (1 GPU on GPU 2, then 2 GPUs, then 4 GPUs; three runs each, the third reported, PNGs against 1 GPU's)
  flux_1gpu_bg 2 step.jsonl
  for c in 1 0 1; do flux_r2 "step_2gpu_early$c.jsonl" TACO_KV_EARLY=$c; done
  wait
  fork_1gpu_then_2gpu 2
  fork_4gpu_after
fi
if [ "$what" = s49 ]; then
  # ninth session: Flux 1024² on 2 GPUs (ring 2 gathered, CUDA graph) with TunableOp (TACO_TUNE_GEMM=1) or not, in
  # the order 1, 0, 1, 0; beside it the 1-GPU baseline on GPU 2 (untuned) and GPU 3 (tuned)
  flux_1gpu_bg 2 step.jsonl
  flux_1gpu_bg 3 step_tuned.jsonl TACO_TUNE_GEMM=1
  for c in 1 0 1 0; do flux_r2 "step_2gpu_tune$c.jsonl" TACO_TUNE_GEMM=$c; done
  wait
fi
if [ "$what" = s50 ]; then
  # ninth session: Flux 1024² on 2 GPUs (ring 2 gathered, CUDA graph): the double blocks' k/v sent before q
  # (TACO_KV_EARLY) x their attention split into own keys while the peer's travel + the peer's keys, merged
  # (TACO_RING_SPLIT), twice each in turn; the 1-GPU baseline beside on GPUs 2 and 3. Then the fork path (1 GPU
  # on GPU 2, 2 GPUs, 4 GPUs) with the setting that was fastest here (early k/v, no split; the split was then removed,
  # so TACO_RING_SPLIT no longer exists)
  for g in 2 3; do flux_1gpu_bg $g "step_gpu$g.jsonl"; done
  for round in 1 2; do
    for c in "1 off" "0 on" "1 on"; do
      set -- $c
      flux_r2 "step_2gpu_early$1_split$2.jsonl" TACO_KV_EARLY=$1 TACO_RING_SPLIT=$2
    done
  done
  wait
  best=$(python3 - "$OUT" <<'PY'
import glob, json, os, re, sys
best = None
for f in glob.glob(os.path.join(sys.argv[1], "step_2gpu_early*_split*.jsonl")):
    ms = [json.loads(l)["step_ms"] for l in open(f) if '"cuda_graph"' in l]
    early, split = re.search(r"early(\d)_split(\w+)\.jsonl", f).groups()
    if ms and (best is None or sum(ms) / len(ms) < best[0]):
        best = (sum(ms) / len(ms), early, split)
print(f"TACO_KV_EARLY={best[1]} TACO_RING_SPLIT={best[2]}")
PY
)
  echo "fork path with $best"
  export $best
  fork_1gpu_then_2gpu 2
  fork_4gpu_after
fi
if [ "$what" = s51 ]; then
  # ninth session, the code as committed: Flux 1024² on 2 GPUs (automatic: ring 2 gathered, k/v sent before q)
  # twice, the 1-GPU baseline beside on GPUs 2 and 3 (CUDA graphs); then the fork path: 1 GPU (GPU 2), 2 GPUs,
  # 4 GPUs, three runs each, the third reported
  for g in 2 3; do flux_1gpu_bg $g "step_gpu$g.jsonl"; done
  for round in 1 2; do flux_r2 step_2gpu.jsonl; done
  wait
  fork_1gpu_then_2gpu 2
  fork_4gpu_after
fi
if [ "$what" = s52 ]; then
  # prepared in the ninth session, run in the tenth: what fills the 7-9 µs gaps before GEMMs in a Flux 1024² step
  # (cuBLAS memsets?) on 1 GPU (GPU 2) and on 2 GPUs (0-1, ring 2 gathered): CUDA-graph profiles with the idle
  # gaps and every event of a double block (attention 5) and a single block (attention 30) in order; beside them
  # on GPU 3, one block's GEMMs in a CUDA graph under cuBLAS settings (probe_gemm_gaps.py), three workspace sizes
  ( for ws in "" 1024 131072; do
      env ${ws:+CUBLASLT_WORKSPACE_SIZE=$ws} CUDA_VISIBLE_DEVICES=3 timeout 100 python3 benchmarks/probe_gemm_gaps.py \
        --out "$OUT/gemm_gaps.jsonl" 2>&1 | fj
    done > "$OUT/gemm_gaps.log" ) &
  CUDA_VISIBLE_DEVICES=2 timeout 150 python3 benchmarks/profile_flux_step.py --sizes 1024 --graph --top 30 \
    --timeline 5 30 --out "$OUT/profile.jsonl" > "$OUT/profile_1gpu.log" 2>&1; echo "1gpu rc=$?"
  CUDA_VISIBLE_DEVICES=0,1 timeout 150 torchrun --nproc_per_node=2 benchmarks/profile_flux_step.py --sizes 1024 \
    --config r2 --graph --top 30 --timeline 5 30 --out "$OUT/profile.jsonl" > "$OUT/profile_r2.log" 2>&1
  echo "r2 rc=$?"
  python3 - "$OUT/profile.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print("gpus", r["gpus"], "rank", r["rank"], "step", r["step_ms"], "busy", r["gpu_busy_ms"], "sm idle", r.get("sm_idle_ms"))
    for g in r.get("idle_gaps", [])[:8]:
        print("   ", g)
    for window in r.get("timeline", []) if r["rank"] == 0 else []:
        print("   layer:", " | ".join(f"{e['start_us']}+{e['us']} s{e['stream']} {e['name'][:28]}" for e in window))
PY
  wait
  python3 - "$OUT/gemm_gaps.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print({k: r.get(k) for k in ("rows", "variant", "workspace_env", "graph_ms_per_block", "kernel_ms_per_block",
                                 "memsets_per_block", "sm_idle_ms_per_block", "memsets_replaced",
                                 "largest_memset_bytes", "max_abs_diff_vs_eager")}, r["gaps"][:3])
PY
fi
if [ "$what" = s53 ]; then
  # tenth session: (1) the memset nodes of captured graphs turned into kernel nodes (graph_memsets.py), on one
  # block's GEMMs (probe_gemm_gaps.py, GPU 3; checked against eager); (2) the Flux 1024² step on 1 GPU with the
  # memsets as kernels (GPU 2) and kept (GPU 3, TACO_GRAPH_MEMSETS=keep) in the background, and on 2 GPUs (0-1, ring
  # 2): default (kernels; the double blocks' q/k/v GEMMs into a contiguous output), memsets kept, the GEMMs into the
  # packed slots as before (TACO_KV_SLOTS_GEMM=1), default again; (3) profiles of the default on 1 and 2 GPUs
  CUDA_VISIBLE_DEVICES=3 timeout 120 python3 benchmarks/probe_gemm_gaps.py --out "$OUT/gemm_gaps.jsonl" 2>&1 | fj
  flux_1gpu_bg 2 step_kernel.jsonl
  flux_1gpu_bg 3 step_keep.jsonl TACO_GRAPH_MEMSETS=keep
  flux_r2 step_2gpu_a.jsonl
  flux_r2 step_2gpu_keep.jsonl TACO_GRAPH_MEMSETS=keep
  flux_r2 step_2gpu_slots.jsonl TACO_KV_SLOTS_GEMM=1
  flux_r2 step_2gpu_b.jsonl
  wait
  ( CUDA_VISIBLE_DEVICES=2 timeout 150 python3 benchmarks/profile_flux_step.py --sizes 1024 --graph --top 30 \
      --out "$OUT/profile.jsonl" > "$OUT/profile_1gpu.log" 2>&1 ) &
  CUDA_VISIBLE_DEVICES=0,1 timeout 150 torchrun --nproc_per_node=2 benchmarks/profile_flux_step.py --sizes 1024 \
    --config r2 --graph --top 30 --out "$OUT/profile.jsonl" > "$OUT/profile_r2.log" 2>&1
  wait
  python3 - "$OUT/profile.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print("gpus", r["gpus"], "rank", r["rank"], "step", r["step_ms"], "busy", r["compute_busy_ms"], "sm idle",
          r.get("sm_idle_ms"), {k: v for k, v in r["gpu_ms_by_category"].items() if k != "collective"})
    for g in r.get("idle_gaps", [])[:6]:
        print("   ", g)
PY
fi
if [ "$what" = s54 ]; then
  # tenth session: the graph memset rewrite's GPU tests; then Flux 1024² on 2 GPUs (0-1, ring 2, CUDA graph) with
  # the memsets as kernel nodes (default) or kept (TACO_GRAPH_MEMSETS=keep), in the order kernel, keep, kernel,
  # keep, the 1-GPU step beside on GPUs 2 and 3; then the fork path (1 GPU on GPU 2, 2 GPUs, 4 GPUs)
  CUDA_VISIBLE_DEVICES=3 timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_graph_memsets_gpu.py \
    2>&1 | tail -5
  for g in 2 3; do flux_1gpu_bg $g "step_gpu$g.jsonl"; done
  for m in kernel keep kernel keep; do flux_r2 "step_2gpu_$m.jsonl" TACO_GRAPH_MEMSETS=$m; done
  wait
  fork_1gpu_then_2gpu 2
  fork_4gpu_after
fi
if [ "$what" = s55 ]; then
  # tenth session: (1) beside each other: the Flux 1024² 1-GPU step with the graph memsets as kernels and kept, in
  # crossed order on GPUs 2 (kernel, keep) and 3 (keep, kernel); the Wan 14B guided 1-GPU baseline on GPU 0; the
  # Flux 2048² 1-GPU fork path on GPU 1 (two runs, the second reported); (2) Wan CFG 2 x Ulysses 2 on 4 GPUs;
  # (3) the Flux 2048² fork path on 4 GPUs, compared with the 1-GPU PNG
  ( for m in kernel keep; do flux_1gpu_bg 2 "step_gpu2_$m.jsonl" TACO_GRAPH_MEMSETS=$m; wait; done ) &
  ( for m in keep kernel; do flux_1gpu_bg 3 "step_gpu3_$m.jsonl" TACO_GRAPH_MEMSETS=$m; wait; done ) &
  ( CUDA_VISIBLE_DEVICES=0 timeout 280 python3 benchmarks/bench_wan_step.py --cfg --out "$OUT/wan_cfg_step.jsonl" \
      2>&1 | fj ) &
  f55() { grep -E '^\{|Error|error:|refused|TACO-DiT plan' | grep -v Warning; }
  CUDA_VISIBLE_DEVICES=1 timeout 200 python3 benchmarks/bench_fork_e2e.py --size 2048 --steps 20 --runs 2 \
    --tag 1gpu2k --out "$OUT/e2e.jsonl" > "$OUT/fork_1gpu_2048.log" 2>&1; f55 < "$OUT/fork_1gpu_2048.log"
  wait
  timeout 170 torchrun --nproc_per_node=4 benchmarks/bench_wan_step.py --cfg --configs c2u2 \
    --out "$OUT/wan_cfg_step_4gpu.jsonl" 2>&1 | fj
  timeout 150 torchrun --nproc_per_node=4 benchmarks/bench_fork_e2e.py --size 2048 --steps 20 --runs 2 \
    --tag auto4_2k --reference /tmp/taco-bench/1gpu2k-rank0/output/bench_00002_.png \
    --out "$OUT/e2e.jsonl" > "$OUT/fork_4gpu_2048.log" 2>&1; f55 < "$OUT/fork_4gpu_2048.log"
fi
if [ "$what" = s56 ]; then
  # tenth session, after exchange.py's three per-destination copy loops became one helper (_on_side_streams):
  # the exchanges on GPUs again. (1) Beside each other: the Flux 1024² 1-GPU step on GPU 2; on GPU 3 cuDNN's
  # attention at the per-rank shapes (probe_attention.py --rank-shapes), then the 1-GPU step there too; Flux on
  # 2 GPUs (0-1, ring 2 gathered: start_gather) twice. (2) Flux on 4 GPUs (Ulysses 4: start with the output into
  # head slots); Wan CFG 2 x Ulysses 2 on 4 GPUs (the arena's staged exchanges), both against 1 GPU's output
  flux_1gpu_bg 2 step_gpu2.jsonl
  ( CUDA_VISIBLE_DEVICES=3 timeout 60 python3 benchmarks/probe_attention.py --rank-shapes \
      --out "$OUT/attention_ranks.jsonl" 2>&1 | fj
    flux_1gpu_bg 3 step_gpu3.jsonl; wait ) &
  for round in 1 2; do flux_r2 step_2gpu.jsonl; done
  wait
  timeout 100 torchrun --nproc_per_node=4 benchmarks/bench_flux_step.py --sizes 1024 --graph --configs u4 \
    --out "$OUT/step_4gpu.jsonl" 2>&1 | fj
  timeout 170 torchrun --nproc_per_node=4 benchmarks/bench_wan_step.py --cfg --configs c2u2 \
    --out "$OUT/wan_cfg_step_4gpu.jsonl" 2>&1 | fj
fi
if [ "$what" = s57 ]; then
  # tenth session: Flux 1024² on 2 GPUs (0-1, ring 2 gathered, CUDA graph) with the single blocks' MLP output GEMM
  # on a side stream beside the attention (TACO_RING_AFTER=overlap) or before it (before), in the order before,
  # overlap, before, overlap, the 1-GPU step beside on GPUs 2 and 3; then the fork path with overlap (1 GPU on
  # GPU 2, 2 GPUs, 4 GPUs; Ulysses 4 does not use it). The overlap measured slower and was removed, so
  # TACO_RING_AFTER no longer exists: this part now runs the committed code four times
  for g in 2 3; do flux_1gpu_bg $g "step_gpu$g.jsonl"; done
  for m in before overlap before overlap; do flux_r2 "step_2gpu_$m.jsonl" TACO_RING_AFTER=$m; done
  wait
  export TACO_RING_AFTER=overlap
  fork_1gpu_then_2gpu 2
  fork_4gpu_after
fi
if [ "$what" = s58 ]; then
  # tenth session: the Wan 14B guided step under CFG 2 x Ulysses 2 on 4 GPUs, eager (as the fork path runs it:
  # Wan is not in model_wrapper.CUDA_GRAPH_VERIFIED) against a CUDA graph of the same forward, in one run
  timeout 400 torchrun --nproc_per_node=4 benchmarks/bench_wan_step.py --cfg --configs c2u2 --graph \
    --out "$OUT/wan_cfg_step_4gpu.jsonl" 2>&1 | grep -E '^\{|Error|error:|Traceback|CUDA graph' | grep -v Warning
fi
if [ "$what" = s59 ]; then
  # tenth session: the attention split over parts of the keys (TACO_ATTN_SPLIT, attention.sdpa_split_keys).
  # (1) Kernel probe on GPU 3 (probe_attention.py --rank-shapes: 2, 3, 4 parts at ring 2's and Ulysses 4's
  # shapes); the 1-GPU Flux 1024² step on GPU 2; Flux on 2 GPUs (0-1, ring 2) with 1 and 3 parts, twice each in
  # turn. (2) Flux on 4 GPUs (Ulysses 4) with 1 and 3 parts. No step got faster, so the split (sdpa_split_keys, the
  # Triton merge, TACO_ATTN_SPLIT and the probe's use of it) was removed again: this part no longer runs as written
  ( CUDA_VISIBLE_DEVICES=3 timeout 90 python3 benchmarks/probe_attention.py --rank-shapes \
      --out "$OUT/attention_ranks.jsonl" 2>&1 | fj ) &
  flux_1gpu_bg 2 step_gpu2.jsonl
  for n in 1 3 1 3; do flux_r2 "step_2gpu_split$n.jsonl" TACO_ATTN_SPLIT=$n; done
  wait
  for n in 1 3; do
    echo "4 GPUs, TACO_ATTN_SPLIT=$n"
    TACO_ATTN_SPLIT=$n timeout 100 torchrun --nproc_per_node=4 benchmarks/bench_flux_step.py --sizes 1024 --graph \
      --configs u4 --out "$OUT/step_4gpu_split$n.jsonl" 2>&1 | fj
  done
fi
if [ "$what" = s60 ]; then
  # tenth session: SM clock and power of every GPU sampled every 200 ms while the Flux 1024² step runs on 1 GPU
  # (GPU 2) beside a 2-GPU ring 2 run (GPUs 0-1): does the 2-GPU run throttle more than the 1-GPU one?
  smi_start "$OUT/smi.csv"
  flux_1gpu_bg 2 step_gpu2.jsonl
  flux_r2 step_2gpu.jsonl
  while pgrep -f bench_flux_step.py > /dev/null; do sleep 1; done  # the 1-GPU run in the background too
  smi_stop "$OUT/smi.csv"
fi
if [ "$what" = s62 ]; then
  # eleventh session: cuBLASLt's fastest bit-identical algorithm for large GEMMs (comfy/taco_dit/utils/lt_gemm.py).
  # (1) beside each other: the kernel probe on GPU 3 (Wan and Flux shapes at 1 GPU's and a rank's rows); the Wan
  # 14B guided 1-GPU step with TACO_LT_GEMM=0 then 1 on GPU 1 and 1 then 0 on GPU 2; (2) Wan CFG 2 x Ulysses 2 on 4
  # GPUs with TACO_LT_GEMM=1, 0, 1
  ( CUDA_VISIBLE_DEVICES=3 timeout 200 python3 benchmarks/probe_lt_gemm.py --out "$OUT/lt_gemm.jsonl" 2>&1 | fj ) &
  for g in 1 2; do
    ( if [ $g = 1 ]; then order="0 1"; else order="1 0"; fi
      for lt in $order; do
        CUDA_VISIBLE_DEVICES=$g TACO_LT_GEMM=$lt timeout 200 python3 benchmarks/bench_wan_step.py --cfg \
          --out "$OUT/wan_cfg_step_gpu${g}_lt$lt.jsonl" 2>&1 | fj | sed "s/^/gpu$g lt$lt /"
      done ) &
  done
  wait
  for lt in 1 0 1; do
    TACO_LT_GEMM=$lt timeout 120 torchrun --nproc_per_node=4 benchmarks/bench_wan_step.py --cfg --configs c2u2 \
      --out "$OUT/wan_cfg_step_4gpu_lt$lt.jsonl" 2>&1 | fj | sed "s/^/4gpu lt$lt /"
  done
fi
if [ "$what" = s63 ]; then
  # eleventh session, after s62 (lt_gemm's tuning now times PyTorch and the candidates alternately, reps back to
  # back; workspaces also inside graph capture): (1) beside each other: the Wan 14B guided 1-GPU step with
  # TACO_LT_GEMM=1 (GPU 0) and 0 (GPU 1); the Flux 1024² 1-GPU step (CUDA graph) with 0 then 1 on GPU 2 and 1 then
  # 0 on GPU 3; (2) Wan CFG 2 x Ulysses 2 on 4 GPUs with 1, 0, 1; (3) Flux on 2 GPUs (ring 2, GPUs 0-1) with 1, 0,
  # 1 while the GPU tests of lt_gemm and graph_memsets run on GPU 2
  for g in 0 1; do
    ( CUDA_VISIBLE_DEVICES=$g TACO_LT_GEMM=$((1 - g)) timeout 220 python3 benchmarks/bench_wan_step.py --cfg \
        --out "$OUT/wan_cfg_step_gpu$g.jsonl" 2>&1 | fj | sed "s/^/wan gpu$g lt$((1 - g)) /" ) &
  done
  ( for lt in 0 1; do flux_1gpu_bg 2 "step_gpu2_lt$lt.jsonl" TACO_LT_GEMM=$lt; wait; done ) &
  ( for lt in 1 0; do flux_1gpu_bg 3 "step_gpu3_lt$lt.jsonl" TACO_LT_GEMM=$lt; wait; done ) &
  wait
  for lt in 1 0 1; do
    TACO_LT_GEMM=$lt timeout 120 torchrun --nproc_per_node=4 benchmarks/bench_wan_step.py --cfg --configs c2u2 \
      --out "$OUT/wan_cfg_step_4gpu_lt$lt.jsonl" 2>&1 | fj | sed "s/^/wan 4gpu lt$lt /"
  done
  ( CUDA_VISIBLE_DEVICES=2 timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_lt_gemm_gpu.py \
      tests/test_graph_memsets_gpu.py > "$OUT/gpu_tests.log" 2>&1; echo "gpu tests rc=$?"; tail -3 "$OUT/gpu_tests.log" ) &
  for lt in 1 0 1; do flux_r2 "step_2gpu_lt$lt.jsonl" TACO_LT_GEMM=$lt | sed "s/^/flux lt$lt /"; done
  wait
fi
if [ "$what" = s64 ]; then
  # eleventh session, lt_gemm from 8192 rows only (TACO_LT_GEMM_MIN_ROWS): (1) beside each other: the Flux 2048²
  # 1-GPU step (CUDA graph; its single blocks have 16896 rows) with TACO_LT_GEMM=0 then 1 on GPU 0 and 1 then 0 on
  # GPU 1; the Wan 14B guided 1-GPU step with the default (GPU 2) and TACO_LT_GEMM=0 (GPU 3); (2) Wan CFG 2 x
  # Ulysses 2 on 4 GPUs: default, 0, default; (3) its profile on every rank with the default
  for g in 0 1; do
    ( if [ $g = 0 ]; then order="0 1"; else order="1 0"; fi
      for lt in $order; do
        CUDA_VISIBLE_DEVICES=$g TACO_LT_GEMM=$lt timeout 220 python3 benchmarks/bench_flux_step.py --sizes 2048 \
          --graph --out "$OUT/step2k_gpu${g}_lt$lt.jsonl" 2>&1 | fj | sed "s/^/flux2k gpu$g lt$lt /"
      done ) &
  done
  ( CUDA_VISIBLE_DEVICES=2 timeout 220 python3 benchmarks/bench_wan_step.py --cfg --out "$OUT/wan_cfg_gpu2.jsonl" \
      2>&1 | fj | sed "s/^/wan gpu2 default /" ) &
  ( CUDA_VISIBLE_DEVICES=3 TACO_LT_GEMM=0 timeout 220 python3 benchmarks/bench_wan_step.py --cfg \
      --out "$OUT/wan_cfg_gpu3_lt0.jsonl" 2>&1 | fj | sed "s/^/wan gpu3 lt0 /" ) &
  wait
  for lt in 1 0 1; do
    TACO_LT_GEMM=$lt timeout 120 torchrun --nproc_per_node=4 benchmarks/bench_wan_step.py --cfg --configs c2u2 \
      --out "$OUT/wan_cfg_4gpu_lt$lt.jsonl" 2>&1 | fj | sed "s/^/wan 4gpu lt$lt /"
  done
  timeout 150 torchrun --nproc_per_node=4 benchmarks/profile_flux_step.py --model wan --config c2u2 --top 12 \
    --out "$OUT/profile_wan_lt.jsonl" > "$OUT/profile_wan_c2u2_lt.log" 2>&1; echo "profile rc=$?"
  python3 - "$OUT/profile_wan_lt.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print("rank", r["rank"], "step", r["step_ms"], "sm idle", r.get("sm_idle_ms"), r["gpu_ms_by_category"])
    for t in r.get("top", [])[:5]:
        print("   ", t)
PY
fi
if [ "$what" = s65 ]; then
  # eleventh session, after s64 (ranks had chosen differently: rank 0 kept PyTorch's kernels everywhere): lt_gemm's
  # tuning now sums 12 rounds in rotating order and takes a 1 % gain. (1) the Wan 14B guided 1-GPU step with the
  # default on GPUs 0 and 1, TACO_LT_GEMM=0 on GPU 2; (2) Wan CFG 2 x Ulysses 2 on 4 GPUs: default, 0, default, 0,
  # each rank's choices printed
  for g in 0 1 2; do
    lt=1; [ $g = 2 ] && lt=0
    ( CUDA_VISIBLE_DEVICES=$g TACO_LT_GEMM=$lt timeout 220 python3 benchmarks/bench_wan_step.py --cfg \
        --out "$OUT/wan_cfg_gpu${g}_lt$lt.jsonl" 2>&1 | fj | sed "s/^/wan gpu$g lt$lt /" ) &
  done
  wait
  for lt in 1 0 1 0; do
    TACO_LT_GEMM=$lt timeout 120 torchrun --nproc_per_node=4 benchmarks/bench_wan_step.py --cfg --configs c2u2 \
      --out "$OUT/wan_cfg_4gpu_lt$lt.jsonl" 2>&1 | fj | sed "s/^/wan 4gpu lt$lt /"
  done
fi
if [ "$what" = s68 ]; then
  # twelfth session: wave_attention as committed (a rank's attention with its small last wave run over parts of the
  # keys). Its GPU tests on GPU 3; then Flux 1024² on 2 GPUs (0-1, ring 2, CUDA graph) with TACO_WAVE_ATTN=1, 0, 1,
  # 0, the 1-GPU step beside on GPUs 2 and 3; then the fork path (1 GPU on GPU 2, then 2 GPUs)
  wave_on_off
  fork_1gpu_then_2gpu 2
fi
if [ "$what" = s69 ]; then
  # twelfth session: s68 again with the split used under CUDA graph capture only (eager keeps one cuDNN call), and
  # the 2-GPU fork path run twice after the 1-GPU one
  wave_on_off
  fork_1gpu_then_2gpu 2
  cp "$OUT/fork_2gpu.log" "$OUT/fork_2gpu_first.log"
  CUDA_VISIBLE_DEVICES=0,1 timeout 130 torchrun --nproc_per_node=2 benchmarks/bench_fork_e2e.py --size 1024 \
    --steps 20 --runs 3 --tag auto2b --reference /tmp/taco-bench/1gpu-rank0/output/bench_00003_.png \
    --out "$OUT/e2e.jsonl" > "$OUT/fork_2gpu.log" 2>&1; grep -E '^\{' "$OUT/fork_2gpu.log"
fi
if [ "$what" = s70 ]; then
  # twelfth session, one GPU: the GPU tests of lt_gemm, graph_memsets and wave_attention as committed; then do a
  # rank's GEMMs lose under the power limit, and would cuBLASLt algorithms timed sustained help
  # (probe_gemm_sustained.py)
  timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_lt_gemm_gpu.py tests/test_graph_memsets_gpu.py \
    tests/test_wave_attention_gpu.py 2>&1 | tail -2
  timeout 300 python3 benchmarks/probe_gemm_sustained.py --out "$OUT/gemm_sustained.jsonl" 2>&1 | fj
fi
if [ "$what" = s71 ]; then
  # twelfth session, one GPU: every cuBLASLt candidate (bit-identical or not) of a rank's Flux GEMMs at 2304 and 2048
  # rows, timed sustained, with its difference to PyTorch's result: would a split-K or stream-K kernel fill the waves?
  timeout 400 python3 benchmarks/probe_gemm_sustained.py --inexact --out "$OUT/gemm_inexact.jsonl" 2>&1 | fj
fi
if [ "$what" = s72 ]; then
  # twelfth session: the ring gather's arrival signalled by flags (stream memory operations) instead of a barrier
  # kernel (TACO_RING_SIGNAL=flags|barrier): Flux 1024² on 2 GPUs (0-1, ring 2, CUDA graph) in the order barrier,
  # flags, barrier, flags, the 1-GPU step beside on GPUs 2 and 3; then the fork path with flags (1 GPU on GPU 2,
  # then 2 GPUs). Measured on a 2 x H200 machine: no gain (67.86/67.53 against 67.78/67.75 ms), so the flags were
  # removed and TACO_RING_SIGNAL no longer exists: this part now runs the committed code four times
  # (on a 2-GPU machine: the 1-GPU step on GPU 0 before the 2-GPU runs and on GPU 1 after them, the fork path's
  # 1-GPU run on GPU 0)
  if [ "$ngpu" -ge 4 ]; then for g in 2 3; do flux_1gpu_bg $g "step_gpu$g.jsonl"; done
  else flux_1gpu_bg 0 step_gpu0.jsonl; wait; fi
  for m in barrier flags barrier flags; do flux_r2 "step_2gpu_$m.jsonl" TACO_RING_SIGNAL=$m; done
  [ "$ngpu" -ge 4 ] || flux_1gpu_bg 1 step_gpu1.jsonl
  wait
  export TACO_RING_SIGNAL=flags
  if [ "$ngpu" -ge 4 ]; then fork_1gpu_then_2gpu 2; else fork_1gpu_then_2gpu 0; fi
fi
if [ "$what" = s73 ]; then
  # twelfth session, the final code: Flux 1024² on 2 GPUs (0-1, ring 2, CUDA graph, wave_attention on) twice with the
  # 1-GPU step beside on GPUs 2 and 3; the fork path on 1 GPU (GPU 2), 2 GPUs and 4 GPUs (no-regression check of
  # the 4-GPU figures). On a 2-GPU machine: the 1-GPU steps before and after, and no 4-GPU run
  if [ "$ngpu" -ge 4 ]; then for g in 2 3; do flux_1gpu_bg $g "step_gpu$g.jsonl"; done
  else flux_1gpu_bg 0 step_gpu0.jsonl; wait; fi
  for m in a b; do flux_r2 "step_2gpu_$m.jsonl"; done
  [ "$ngpu" -ge 4 ] || flux_1gpu_bg 1 step_gpu1.jsonl
  wait
  if [ "$ngpu" -ge 4 ]; then fork_1gpu_then_2gpu 2; fork_4gpu_after; else fork_1gpu_then_2gpu 0; fi
fi
if [ "$what" = s74 ]; then
  # twelfth session, one GPU, the final code: the GPU tests of wave_attention, lt_gemm and graph_memsets, and the
  # attention probe (kernels, plans, a 5 s mini-step) through the shared graph helper
  timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_wave_attention_gpu.py tests/test_lt_gemm_gpu.py \
    tests/test_graph_memsets_gpu.py 2>&1 | tail -2
  timeout 300 python3 benchmarks/probe_attention_tail.py --seconds 5 --out "$OUT/attention_tail.jsonl" 2>&1 \
    | grep -E '"torch_single"|"main": 22, "parts": 3|mini_step|Error|error:|Traceback'
fi
# thirteenth session: the Flux 1024² step profiled at the power limit (CUDA graph; after 12 s of back-to-back steps,
# 4 steps back to back), clocks and power sampled meanwhile. sustained_pair NAME [ARGS]: one process on each of GPUs 0
# and 1 at once; sustained_r2: the 2-GPU ring-2 step on both; sustained_summary: what they printed
sustained_pair() { local name=$1 pids=""; shift
  smi_start "$OUT/smi_$name.csv"
  for g in 0 1; do
    ( CUDA_VISIBLE_DEVICES=$g timeout 200 python3 benchmarks/profile_flux_step.py --graph --sustain 12 --steps 4 \
        --top 40 "$@" --out "$OUT/profile_${name}_gpu$g.jsonl" > "$OUT/profile_${name}_gpu$g.log" 2>&1
      echo "$name gpu$g rc=$?" ) &
    pids="$pids $!"
  done
  wait $pids
  echo "$name:"; smi_stop "$OUT/smi_$name.csv"
}
sustained_r2() {
  smi_start "$OUT/smi_r2.csv"
  timeout 200 torchrun --nproc_per_node=2 benchmarks/profile_flux_step.py --graph --config r2 --sustain 12 --steps 4 \
    --top 40 --out "$OUT/profile_r2.jsonl" > "$OUT/profile_r2.log" 2>&1; echo "r2 rc=$?"
  echo "r2:"; smi_stop "$OUT/smi_r2.csv"
}
sustained_summary() {
  python3 -c '
import json, os, sys
for name in sys.argv[1:]:
  for line in open(name):
    r = json.loads(line)
    print(os.path.basename(name), r["config"], "gpus", r["gpus"], "rank", r["rank"], "step", r["step_ms"], r.get("steps_ms"), "calls",
          r.get("sustained_calls"), "busy", r["compute_busy_ms"], "idle", r["sm_idle_ms"], r["gpu_ms_by_category"])
    for k in r["top"][:int(os.environ.get("TOP", "14"))]:
        print("   ", k["kernel"][:60], k["ms"], k["calls"], k["mean_us"])
' "$OUT"/profile_*.jsonl
  for f in "$OUT"/profile_*.log; do grep -E "Error|error:|Traceback" "$f" | head -3; done
}
if [ "$what" = s76 ]; then
  # thirteenth session, 2 GPUs: where the 2-GPU Flux 1024² step loses once the GPUs sit at their power limit: the
  # 1-GPU step on both GPUs at once, then the 2-GPU ring-2 step
  sustained_pair 1gpu
  sustained_r2
  sustained_summary
fi
if [ "$what" = s77 ]; then
  # thirteenth session, 2 GPUs: as s76, and between the two one rank's share of ring 2 alone on each GPU (no
  # exchange, no barrier, no peer: benchmarks/solo_rank.py)
  sustained_pair 1gpu
  sustained_pair solo2 --solo 2
  sustained_r2
  sustained_summary
fi
if [ "$what" = s78 ]; then
  # thirteenth session, 2 GPUs: s77 on one machine with the sustained phase's length fixed (s77's 2-GPU run had
  # timed a slow first call and sustained 1 s only), then the step bench as in s73 on a 2-GPU machine (the 1-GPU
  # step on GPU 0 before the two 2-GPU runs and on GPU 1 after them)
  sustained_pair 1gpu
  sustained_pair solo2 --solo 2
  sustained_r2
  flux_1gpu_bg 0 step_gpu0.jsonl; wait
  for m in a b; do flux_r2 "step_2gpu_$m.jsonl"; done
  flux_1gpu_bg 1 step_gpu1.jsonl; wait
  # and one rank's share alone on GPU 0 (GPU 1 idle), plain, with its k/v copied to GPU 1 by copy engine where the
  # real step sends them, and copied within GPU 0: what the traffic alone costs
  for push in none peer local; do
    smi_start "$OUT/smi_solo2_$push.csv"
    CUDA_VISIBLE_DEVICES=0,1 timeout 150 python3 benchmarks/profile_flux_step.py --graph --sustain 12 --steps 4 \
      --top 40 --solo 2 $([ $push = none ] || echo --solo-push $push) --out "$OUT/profile_solo2_$push.jsonl" \
      > "$OUT/profile_solo2_$push.log" 2>&1; echo "solo2 $push rc=$?"
    echo "solo2 $push:"; smi_stop "$OUT/smi_solo2_$push.csv"
  done
  TOP=5 sustained_summary
  # one archive comes back whole (the device tool returns a limited number of files)
  (cd "$OUT" && tar czf raw_s78.tgz ./*.jsonl ./*.csv ./*.log && rm -f ./*.jsonl ./*.csv ./*.log)
fi
if [ "$what" = s79 ]; then
  # thirteenth session, 2 GPUs: uneven image-token shares for the ring of two (commit e9810ca, TACO_SP_BALANCE=off,
  # auto, 0.49,0.51, 0.51,0.49, auto in turn). On an equal pair the forced shares were 0.5-1.05 ms slower than the
  # even split, the larger rank losing its attention's wave split, so they were removed (RESULTS.md, thirteenth
  # session). This part now runs the committed code: the fork path (1 GPU on GPU 0, then 2 GPUs), then the 1-GPU
  # step on GPU 0 before and GPU 1 after one 2-GPU run
  fork_1gpu_then_2gpu 0
  flux_1gpu_bg 0 step_gpu0.jsonl; wait
  flux_r2 step_2gpu.jsonl
  flux_1gpu_bg 1 step_gpu1.jsonl; wait
fi
if [ "$what" = s75 ]; then
  # twelfth session, one GPU: wave_attention's tail on a side stream beside the main call (TACO_WAVE_ATTN_TAIL=stream)
  # against after it, at kernel level (the production run_split) and in the 38-block stack. The side stream was
  # slower (22/3: 0.2156 against 0.2112 ms; stack 40.40 against 40.00 ms) and was removed: this part now times the
  # production run_split as committed
  timeout 300 python3 benchmarks/probe_attention_tail.py --seconds 12 --out "$OUT/attention_tail.jsonl" 2>&1 \
    | grep -E '"torch_single"|"main": 22, "parts": 3|run_split|mini_step|Error|error:|Traceback'
fi
if [ "$what" = s67 ]; then
  # twelfth session, one GPU: ring 2's attention with its last wave split over parts of the keys (kernels, every
  # plan cuDNN's frontend offers, and a 38-block mini-step at the power limit; probe_attention_tail.py)
  timeout 420 python3 benchmarks/probe_attention_tail.py --seconds 20 --out "$OUT/attention_tail.jsonl" 2>&1 | fj
fi
if [ "$what" = s66 ]; then
  # eleventh session, one GPU: the GPU tests of lt_gemm (as committed: 8192-row threshold, rotating tuning rounds)
  # and graph_memsets
  timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_lt_gemm_gpu.py tests/test_graph_memsets_gpu.py \
    2>&1 | tail -4
  # then (run twice, the second time after the settings became module constants) the kernel probe at the default
  # threshold: the Wan shapes are tuned, the Flux ones (under 8192 rows) keep PyTorch's path
  timeout 200 python3 benchmarks/probe_lt_gemm.py --out "$OUT/lt_gemm.jsonl" 2>&1 | fj
fi
if [ "$what" = s61 ]; then
  # prepared in the tenth session for the next (not run yet): where Wan's guided step under CFG 2 x Ulysses 2 on 4
  # GPUs loses against a quarter of one GPU's (3.60-3.62x of the 4x): a profile of one prompt's forward on 1 GPU
  # (GPU 0), then the 4-GPU guided step profiled on every rank (idle gaps, categories, top kernels)
  CUDA_VISIBLE_DEVICES=0 timeout 200 python3 benchmarks/profile_flux_step.py --model wan --top 30 \
    --out "$OUT/profile_wan.jsonl" > "$OUT/profile_wan_1gpu.log" 2>&1; echo "1gpu rc=$?"
  timeout 300 torchrun --nproc_per_node=4 benchmarks/profile_flux_step.py --model wan --config c2u2 --top 30 \
    --out "$OUT/profile_wan.jsonl" > "$OUT/profile_wan_c2u2.log" 2>&1; echo "c2u2 rc=$?"
  python3 - "$OUT/profile_wan.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print("gpus", r["gpus"], "rank", r["rank"], "step", r["step_ms"], "busy", r["compute_busy_ms"], "sm idle",
          r.get("sm_idle_ms"), r["gpu_ms_by_category"])
    for g in r.get("idle_gaps", [])[:6]:
        print("   ", g)
PY
fi
if [ "$what" = s28 ]; then
  # sixth session, on 2 GPUs: one Wan 14B forward under Ulysses 2 (arena, automatic), the cross-attention's context
  # k/v as the self-attention's side work or not, in the order on, off, off, on
  timeout 200 torchrun --nproc_per_node=2 benchmarks/bench_wan_step.py --configs u2 --context-side-work on off off on \
    --out "$OUT/wan_u2_side.jsonl" 2>&1 | grep -E '^\{|Error|error:|Traceback' | grep -v Warning
fi
if [ "$what" = step ] || [ "$what" = all ]; then
  python3 benchmarks/bench_flux_step.py --sizes 1024 2048 --graph --diffusers --out "$OUT/step.jsonl" 2>&1 | filter
  [ "$ngpu" -ge 4 ] && torchrun --nproc_per_node=4 benchmarks/bench_flux_step.py --sizes 1024 2048 --graph \
    --configs u4 u2r2 --out "$OUT/step.jsonl" 2>&1 | filter
  torchrun --nproc_per_node=2 benchmarks/bench_flux_step.py --sizes 1024 2048 --graph --configs u2 \
    --out "$OUT/step.jsonl" 2>&1 | filter
fi
if [ "$what" = wan ] || [ "$what" = all ]; then
  python3 benchmarks/bench_wan_step.py --graph --diffusers --out "$OUT/wan_step.jsonl" 2>&1 | filter
  [ "$ngpu" -ge 4 ] && torchrun --nproc_per_node=4 benchmarks/bench_wan_step.py --graph --configs u4 u2r2 \
    --out "$OUT/wan_step.jsonl" 2>&1 | filter
fi
if [ "$what" = e2e ] || [ "$what" = all ]; then
  ref=/tmp/taco-bench/1gpu-rank0/output/bench_00002_.png
  python3 benchmarks/bench_fork_e2e.py --size 1024 --steps 20 --tag 1gpu --out "$OUT/e2e.jsonl" 2>&1 | filter
  python3 benchmarks/bench_fork_e2e.py --size 1024 --steps 20 --tag 1gpug --cuda-graph on --out "$OUT/e2e.jsonl" 2>&1 | filter
  [ "$ngpu" -ge 4 ] && torchrun --nproc_per_node=4 benchmarks/bench_fork_e2e.py --size 1024 --steps 20 --tag auto4 \
    --reference $ref --out "$OUT/e2e.jsonl" 2>&1 | filter
  torchrun --nproc_per_node=2 benchmarks/bench_fork_e2e.py --size 1024 --steps 20 --tag auto2 \
    --reference $ref --out "$OUT/e2e.jsonl" 2>&1 | filter
fi
