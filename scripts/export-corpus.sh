#!/usr/bin/env bash
# Exports the bundled real-text corpora from Debian's packages into a directory (default data/):
#   kjv.txt       the King James Bible (bible-kjv-text, public domain), 4.3 MB of prose
#   fortunes.txt  modern quotations (fortunes, fortunes-min; BSD), a second source of a
#                 different character for task experiments
set -euo pipefail
out=${1:-data}
mkdir -p "$out"
if [ ! -s "$out/kjv.txt" ]; then
  # Drop the book/chapter headers and the verse numbers; keep the prose.
  bible -p /usr/lib -m 8192 'Gen1:1-Rev22:21' |
    sed -E -e '/^[A-Za-z0-9 ]+ [0-9]+$/d' -e 's/^ *[0-9]+ //' -e '/^$/d' > "$out/kjv.txt.tmp"
  mv "$out/kjv.txt.tmp" "$out/kjv.txt"
fi
if [ ! -s "$out/fortunes.txt" ]; then
  # Plain fortune files (not the .dat indexes nor the rot13 offensive ones).
  find /usr/share/games/fortunes -maxdepth 1 -type f ! -name '*.dat' ! -name '*.u8' -print0 |
    sort -z | xargs -0 cat | sed -e '/^%$/d' > "$out/fortunes.txt.tmp"
  mv "$out/fortunes.txt.tmp" "$out/fortunes.txt"
fi
wc -c "$out/kjv.txt" "$out/fortunes.txt"
