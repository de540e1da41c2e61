#!/bin/sh
# Usage: fuzz/run.sh <target> <seconds>: one fuzzing run of a built target (see docs/fuzzing.md),
# with new inputs in fuzz/corpus-new/<target> and logs in fuzz/logs/.
set -eu
cd "$(dirname "$0")"
here=$(pwd)
t=$1
secs=$2
mkdir -p corpus-new/"$t" artifacts/"$t" logs/"$t".work
log=$here/logs/"$t"-"$(date +%H%M)"
# With -jobs, libFuzzer writes the worker's output (the coverage lines) to fuzz-0.log in the
# current directory: one directory per target keeps concurrent runs apart.
cd logs/"$t".work
nice -n 19 "$here"/target/x86_64-unknown-linux-gnu/release/"$t" \
    -jobs=1 -workers=1 -timeout=5 -rss_limit_mb=2048 -malloc_limit_mb=2048 \
    -max_total_time="$secs" -print_final_stats=1 -artifact_prefix="$here"/artifacts/"$t"/ \
    "$here"/corpus-new/"$t" "$here"/corpus/"$t" > "$log".log 2>&1 || true
mv fuzz-0.log "$log".worker.log 2>/dev/null || true
