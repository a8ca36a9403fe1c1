# Sourced by the scripts: CPU torch runs 2-3x faster without glibc's mmap churn.
export MALLOC_MMAP_MAX_=0
export MALLOC_TRIM_THRESHOLD_=100000000000
export DERMSIGHT_DATA=${DERMSIGHT_DATA:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/shared/datasets}
