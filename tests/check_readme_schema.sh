#!/usr/bin/env bash
# check_readme_schema.sh MOE_CONFIG README: every row of `moe-config schema` is in the README.
set -u
missing=0
while IFS= read -r line; do
  if ! grep -qxF -- "$line" "$2"; then echo "README lacks: $line"; missing=1; fi
done < <("$1" schema)
[ $missing -eq 0 ] && echo "README documents every config key"
exit $missing
