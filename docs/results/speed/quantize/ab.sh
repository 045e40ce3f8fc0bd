#!/bin/bash
# A/B: base (main + profile instrumentation) then new, same quiet session. args: method nblocks
set -e
cd /tmp/speed
for side in base new; do
  if [ $side = base ]; then SRC=/tmp/speed/src_base; else SRC=/work/wt-speed/src; fi
  echo "== $side $(uptime)"
  SAVE=/tmp/speed/sd_$1_$side.pt PYTHONPATH=$SRC /usr/bin/time -f "maxrss_kb %M elapsed %e" python /tmp/speed/bench.py "$@" 2>&1 | grep -v "Loading\|^$"
done
python /tmp/speed/cmp.py /tmp/speed/sd_$1_base.pt /tmp/speed/sd_$1_new.pt
