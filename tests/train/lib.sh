# lib.sh — sourced by the moe-train program tests in this folder.
#
# The environment comes from tests/CMakeLists.txt: MOE_TRAIN (the binary), MOE_TINY
# (examples/configs/tiny.yaml), MOE_DATA (the genesis token file), MOE_MPIRUN (mpirun and its
# flags), MOE_SCRATCH (this test's own directory, emptied here), MOE_TESTS (this folder).
#
#   train NP NAME [ARGS...]   tiny.yaml on NP ranks; metrics in $S/NAME.jsonl, log in
#                             $S/NAME.log, checkpoints in $S/NAME/ck unless ARGS set
#                             checkpoint.dir; fails the test (with the log's tail) on a
#                             non-zero exit or after 90 s.
#   compare ARGS...           compare_metrics.py (see there)
#   fail MESSAGE              print "FAIL: MESSAGE" and exit 1
set -u -o pipefail
: "${MOE_TRAIN:?}" "${MOE_TINY:?}" "${MOE_DATA:?}" "${MOE_MPIRUN:?}" "${MOE_SCRATCH:?}" \
  "${MOE_TESTS:?}"
S=$MOE_SCRATCH
rm -rf "$S"
mkdir -p "$S"
read -r -a MPIRUN <<<"$MOE_MPIRUN"

fail() {
  echo "FAIL: $*"
  exit 1
}

train() {
  local np=$1 name=$2
  shift 2
  echo "+ np $np: moe-train $* (log $S/$name.log)"
  if ! timeout --kill-after=5 90 "${MPIRUN[@]}" -np "$np" "$MOE_TRAIN" --config "$MOE_TINY" \
      --set "data.path=$MOE_DATA" --set "run.dir=$S/$name/run" \
      --set "checkpoint.dir=$S/$name/ck" --metrics "$S/$name.jsonl" "$@" >"$S/$name.log" 2>&1
  then
    tail -n 20 "$S/$name.log"
    fail "moe-train np $np ($name) exited non-zero"
  fi
}

compare() {
  /usr/bin/python3 "$MOE_TESTS/compare_metrics.py" "$@"
}
