#!/usr/bin/env bash
# GPU job (#12): where a completion's time goes when the service runs on the H200. Starts the service as
# h200-serve.sh does, warms every library adapter up, then runs the ignore_eos completions bench (c=64) while
# py-spy records each Serve process (proxy, Gateways, LLM, ...) for 10 s.
# -> $OUT/spy.tgz (spy-<name>.txt: collapsed stacks), $OUT/bench_*.json, $OUT/ps.txt, gpu-util.txt, llm-log.txt
set -u
. training/jobs/common.sh
. training/jobs/serve-start.sh
B="python3 hyperlora.py bench serve --url http://127.0.0.1:8000 --concurrency 64 --max-tokens 64 --endpoints completions"
timeout 100 $B --requests 320 --out $OUT/bench_warm.json 2>&1 | grep "POST"
ps -eo pid,pcpu,args | grep -E "ray::|ServeReplica|ProxyActor" | grep -v grep > $OUT/ps.txt
( timeout 150 $B --requests 768 --ignore-eos --out $OUT/bench_eos.json 2>&1 | grep "POST" ) &
PIDS=$!
sleep 4; SPY=$(ls /tmp/site/bin/py-spy 2>/dev/null || command -v py-spy); echo "py-spy: $SPY"
for pid in $(grep -E "ServeReplica|ProxyActor" $OUT/ps.txt | awk '{print $1}'); do
  name=$(grep "^ *$pid " $OUT/ps.txt | grep -oE "(ServeReplica:[A-Za-z:_]+|ProxyActor)" | head -1 | tr ':' '_')
  $SPY record -p $pid -d 10 -r 100 -f raw -o $OUT/spy-$name-$pid.txt --nonblocking > /dev/null 2>&1 &
  PIDS="$PIDS $!"
done
sleep 2; top -b -n 1 | head -25 > $OUT/top.txt
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -l 1 > $OUT/gpu-util.txt 2>&1 &
SMI=$!
wait $PIDS  # not the service (also a child of this shell)
kill $SMI 2>/dev/null
echo "GPU utilisation under load (1 s samples): $(cut -d, -f1 $OUT/gpu-util.txt | tr '\n' ' ')"
L=/tmp/ray/session_latest/logs/serve
grep -h "captur\|eagerly\|static decode\|generated .* tokens for" $L/replica_hyperlora_LLM_*.log 2>/dev/null | tail -60 > $OUT/llm-log.txt
grep -c "captured the decode step" $OUT/llm-log.txt; grep "failed\|eagerly" $OUT/llm-log.txt | head -5
grep "generated .* tokens for" $OUT/llm-log.txt | tail -8
cat $OUT/top.txt | head -22
ls -la $OUT
pkill -f "hyperlora.py serve"; python3 -m ray.scripts.scripts stop --force > /dev/null 2>&1
# few files come back from a run: the stacks travel as one archive
(cd $OUT && tar czf spy.tgz spy-*.txt && rm -f spy-*.txt)
