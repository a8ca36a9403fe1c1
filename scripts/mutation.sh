#!/usr/bin/env bash
# Mutation testing (mutmut, pinned in the dev extra) of the modules where a silent bug makes
# every reported accuracy optimistic or a clinic's data wrong, each against its own fast tests:
#
#   dataset      src/dermsight/data/dataset.py           tests/test_leakage.py, test_dataset.py, test_bad_input.py
#   calibration  src/dermsight/evaluation/calibration.py tests/test_calibration.py
#   sanitize     src/dermsight/imaging/sanitize.py       tests/test_sanitize.py, test_fuzz.py
#   context      src/dermsight/inference/context.py      tests/test_context.py
#
# Fast tests only (mutmut forks one pytest run per mutant, module fixtures included): not the
# tests that fold 8,000 real records (test_dataset's `folded`), fuzz the API through a trained
# bundle (test_fuzz's API tests) or score real patients (test_context's real-data test).
#
# Slow (tens of minutes per module on 2 cores; not in CI): run it by hand, niced, e.g.
#   nice -n 10 scripts/mutation.sh                  # all four
#   nice -n 10 scripts/mutation.sh calibration      # one
# Each module runs in a throwaway copy of the work tree (tracked and untracked files; the tree
# itself is never touched). Prints, per module, mutmut's counts (killed, survived, ...) and
# the surviving mutants' names; `MUTATION_KEEP=DIR` keeps the copies there to inspect them
# (`cd DIR/<module> && mutmut show <name>`). MUTATION_JOBS: mutants run at once (default 2).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
mutmut=${MUTMUT:-$repo/.venv/bin/mutmut}
declare -A SOURCE=(
  [dataset]=src/dermsight/data/dataset.py
  [calibration]=src/dermsight/evaluation/calibration.py
  [sanitize]=src/dermsight/imaging/sanitize.py
  [context]=src/dermsight/inference/context.py
)
fuzz=tests/test_fuzz.py
declare -A TESTS=(
  [dataset]="tests/test_leakage.py tests/test_dataset.py::test_ham10000_and_isic9_share_1381_images
    tests/test_dataset.py::test_deduplicate_ham10000_and_isic9 tests/test_dataset.py::test_isic9_scc_refines_ham_akiec
    tests/test_dataset.py::test_groups_join_patients_and_lesions_transitively
    tests/test_dataset.py::test_too_few_groups_for_the_folds_is_a_clear_error
    tests/test_dataset.py::test_manifest_round_trip tests/test_dataset.py::test_load_manifest_refuses_other_csvs
    tests/test_dataset.py::test_manifest_ids_stay_text tests/test_bad_input.py"
  [calibration]="tests/test_calibration.py"
  [sanitize]="tests/test_sanitize.py $fuzz::test_magic_bytes_then_garbage $fuzz::test_random_bytes
    $fuzz::test_mutated_real_images $fuzz::test_dicom_findings_are_image_errors
    $fuzz::test_a_broken_header_element_is_dropped_with_the_header"
  [context]="tests/test_context.py::test_the_odd_lesion_out_gets_the_highest_distance_and_score
    tests/test_context.py::test_context_by_value_on_a_hand_made_patient
    tests/test_context.py::test_single_lesion_and_unknown_patients_fall_back_cleanly
    tests/test_context.py::test_a_two_image_patient_after_a_lone_one_with_risks_at_zero_and_one"
)
modules=("$@")
[ ${#modules[@]} -gt 0 ] || modules=(dataset calibration sanitize context)
for module in "${modules[@]}"; do
  [ -n "${SOURCE[$module]:-}" ] || { echo "unknown module '$module'; choose from ${!SOURCE[*]}" >&2; exit 2; }
done

work=${MUTATION_KEEP:-$(mktemp -d -t dermsight-mutation-XXXXXX)}
mkdir -p "$work"
[ -n "${MUTATION_KEEP:-}" ] || trap 'rm -rf "$work"' EXIT
[ -f "$repo/scripts/env.sh" ] && source "$repo/scripts/env.sh"  # DERMSIGHT_DATA, malloc settings

for module in "${modules[@]}"; do
  copy="$work/$module"
  rm -rf "$copy" && mkdir -p "$copy"
  (cd "$repo" && git ls-files -z --cached --others --exclude-standard -- src tests pyproject.toml \
     | xargs -0 tar -c) | tar -x -C "$copy"
  {
    echo "[mutmut]"
    echo "source_paths = src"
    echo "only_mutate = ${SOURCE[$module]}"
    printf 'pytest_add_cli_args =\n    -p\n    no:cacheprovider\n    -p\n    no:xdist\n'
    echo "pytest_add_cli_args_test_selection ="
    for test in ${TESTS[$module]}; do [ -e "$copy/${test%%::*}" ] && echo "    $test"; done  # (older trees lack some)
  } > "$copy/setup.cfg"
  echo "== $module: ${SOURCE[$module]} against ${TESTS[$module]}"
  started=$(date +%s)
  # mutmut imports the mutated copy (mutants/src) and removes ./src from sys.path itself.
  (cd "$copy" && PYTHONPATH="$copy/src" "$mutmut" run --max-children "${MUTATION_JOBS:-2}" > mutmut-run.log 2>&1) \
    || { echo "mutmut run failed for $module; its log:" >&2; tail -30 "$copy/mutmut-run.log" >&2; exit 1; }
  (cd "$copy" && "$mutmut" export-cicd-stats > /dev/null && cat mutants/mutmut-cicd-stats.json && echo)
  echo "surviving mutants:"
  (cd "$copy" && "$mutmut" results)  # every mutant not killed, with its status
  echo "($(( $(date +%s) - started )) s)"
done
