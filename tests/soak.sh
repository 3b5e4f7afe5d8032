#!/usr/bin/env bash
# Soak the suite the way CI runs it: `bash .ci/run` on a fresh clone of this repository's
# committed HEAD, N times in a row, optionally beside K busy-loop processes, stopping at the
# first run that fails. A run passes only when .ci/run exits 0 and pytest's summary line
# counts no skipped, xfailed or xpassed test. docs/testing.md says why and how it is used.
#
#   tests/soak.sh [--runs N] [--busy K] [--out DIR]
#
# Each run's full output goes to DIR/run-<i>.log (its first line the commit); one table row
# per run is appended to DIR/summary.md. A failed run's clone is kept for inspection.
set -uo pipefail

runs=1
busy=0
out=out/soak-ci
while [ $# -gt 0 ]; do
    case "$1" in
        --runs) runs=$2; shift 2 ;;
        --busy) busy=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "soak: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$runs$busy" in
    *[!0-9]*) echo "soak: --runs and --busy take whole numbers" >&2; exit 2 ;;
esac

repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel) || exit 2
commit=$(git -C "$repo" rev-parse --short HEAD) || exit 2
if [ -n "$(git -C "$repo" status --porcelain --untracked-files=no)" ]; then
    echo "soak: uncommitted changes are not soaked: runs test $commit as committed" >&2
fi
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
summary=$out/summary.md
[ -s "$summary" ] || printf '| run | commit | busy loops | pytest summary | pytest | wall | result |\n|---|---|---|---|---|---|---|\n' > "$summary"

loops=()
stop_loops() {
    local pid
    for pid in "${loops[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${loops[@]}"; do wait "$pid" 2>/dev/null; done
    loops=()
}
trap stop_loops EXIT
trap 'exit 130' INT TERM

clock() { printf '%d:%02d' $(($1 / 60)) $(($1 % 60)); }

for ((i = 1; i <= runs; i++)); do
    n=$(($(ls "$out"/run-*.log 2>/dev/null | wc -l) + 1))
    log=$out/run-$n.log
    clone=$(mktemp -d "${TMPDIR:-/tmp}/sluiceway-soak-XXXXXX")
    git clone -q "$repo" "$clone" || exit 2
    git -C "$clone" rev-parse HEAD > "$log"
    for ((b = 0; b < busy; b++)); do
        ( while :; do :; done ) &
        loops+=($!)
    done
    echo "soak: run $n ($i of $runs) of $commit beside $busy busy loops: $log"
    start=$(date +%s)
    (cd "$clone" && bash .ci/run) >> "$log" 2>&1
    rc=$?
    wall=$(($(date +%s) - start))
    stop_loops
    line=$(grep -E '^=+ .* in [0-9.]+s' "$log" | tail -1 | sed -E 's/^=+ //; s/ =+$//')
    counts=$(echo "$line" | sed -E 's/ in [0-9.]+s.*//')
    took=$(echo "$line" | grep -oE '\(([0-9]+:)?[0-9]+:[0-9]+\)' | tr -d '()' | sed -E 's/^0://')
    result=passed
    if [ "$rc" != 0 ]; then
        result="failed (rc=$rc)"
    elif [ -z "$line" ] || echo "$counts" | grep -qE 'skipped|xfailed|xpassed'; then
        result="failed (not every test ran: ${counts:-no pytest summary})"
    fi
    echo "rc=$rc wall=${wall}s" >> "$log"
    printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$n" "$commit" "$busy" "${counts:-none}" \
        "${took:-?}" "$(clock "$wall")" "$result" >> "$summary"
    echo "soak: run $n $result: ${counts:-no pytest summary}, wall $(clock "$wall")"
    if [ "$result" != passed ]; then
        echo "soak: stopped; the failed run's clone is kept at $clone" >&2
        exit 1
    fi
    rm -rf "$clone"
done
echo "soak: $runs of $runs passed; table: $summary"
