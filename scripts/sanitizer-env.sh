# Sourced by scripts/sanitize.sh and scripts/fuzz.sh: how the sanitizers report. Every finding
# stops the process with an error; leaks are reported except those of LibTorch's, OpenCV's and
# Gloo's own one-time allocations (tests/fuzz/lsan.supp).
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:detect_odr_violation=0:strict_string_checks=1:check_initialization_order=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export LSAN_OPTIONS="suppressions=$root/tests/fuzz/lsan.supp:print_suppressions=0"
