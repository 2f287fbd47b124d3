# Sourced by scripts/sanitize.sh and scripts/fuzz.sh: how the sanitizers report. Every finding
# stops the process with an error; leaks are reported except those of LibTorch's, OpenCV's and
# Gloo's own one-time allocations (tests/fuzz/lsan.supp).
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:detect_odr_violation=0:strict_string_checks=1:check_initialization_order=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export LSAN_OPTIONS="suppressions=$root/tests/fuzz/lsan.supp:print_suppressions=0"
# Debian 12's oneDNN (libdnnl2 2.6.3, under LibTorch's CPU convolutions) reads past an allocation
# while it creates its AMX convolution kernels (Intel Xeons with AMX, bf16): harmless under
# glibc's allocator, a SEGV under ASan's (32 of 60 runs of cli_faults' pretraining on a loaded
# 2-core AMX Xeon, 0 of 60 with AMX left out). Instrumented runs use oneDNN's AVX-512 bf16
# kernels instead; a cap, not a requirement: machines without AMX are unaffected. A value set
# outside is kept.
export ONEDNN_MAX_CPU_ISA=${ONEDNN_MAX_CPU_ISA:-AVX512_CORE_BF16}
