# Dataset helpers of `make run` (sourced by run_local.sh; tested by tests/test_run_local_helpers.py).
# run_local.sh runs under `set -euo pipefail`: a reader that stops early (head, grep -q/-m) makes the
# writer die of SIGPIPE once the output outgrows the pipe buffer (a few thousand paths), and pipefail
# turns that into exit 141. Every pipe here reads its input to the end.

# Object-name-safe name of a dataset folder: /data/My Flowers -> my-flowers
dataset_name() {
  basename "$1" | tr '[:upper:]' '[:lower:]' | tr -c 'a-z0-9_\n-' '-'
}

# First image of a dataset folder (sorted), for the example request `make run` prints; empty if none.
example_image() {
  find "$1" -type f \( -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.png' \) | LC_ALL=C sort | sed -n 1p
}
