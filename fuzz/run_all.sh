#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 600), two at a time, niced,
# growing fuzz/corpus/TARGET (ignored by git) from fuzz/seeds/TARGET
# (committed, never written to). Logs go to fuzz/logs/TARGET.log (ignored);
# the last libFuzzer status line of each is printed at the end.
set -u
cd "$(dirname "$0")"
secs=${1:-600}
targets=(request_head ws_frames ws_session cursor close_payload proxy_header publication token origin client_message grpc_frames)
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O -a || exit 1
mkdir -p logs
run() {
    mkdir -p "corpus/$1"
    nice cargo fuzz run -O -a "$1" "corpus/$1" "seeds/$1" -- \
        -max_total_time="$secs" -print_final_stats=1 >"logs/$1.log" 2>&1
    echo "$1: exit $?"
}
for ((i = 0; i < ${#targets[@]}; i += 2)); do
    run "${targets[i]}" &
    [[ -n ${targets[i + 1]:-} ]] && run "${targets[i + 1]}" &
    wait
done
for t in "${targets[@]}"; do
    echo "$t: $(grep -E '^#[0-9]+' "logs/$t.log" | tail -n 1)"
    grep -E 'stat::number_of_executed_units|panicked|ERROR: libFuzzer' "logs/$t.log"
done
