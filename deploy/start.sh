#!/usr/bin/env bash
# Start yinshi on this machine: the engine service, the retrain daemon and the bot, together.
#
#   deploy/start.sh            # from the repository root or anywhere; Ctrl-C (or the bot exiting) stops all
#
# On a fresh machine it creates .venv and installs the project (torch pin first: a looser torch pulls a
# large CUDA build where it is not wanted). Settings come from the environment and ./.env, the environment
# winning (see .env.example). With TELEGRAM_BOT_TOKEN set the bot runs on Telegram (`python -m bot run`);
# without it you get the local console chat (`python -m bot console`) on the embedded defaults: the shipped
# checkpoints, a SQLite file under var/. The engine and the trainer log to var/log/.
#
# Knobs: PYTHON (interpreter for the venv, default python3), TORCH_VERSION (default 2.13.0),
# TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu for the small CPU-only wheels),
# YINSHI_NO_TRAINER=1 (do not start the retrain daemon).
if [ -z "${BASH_VERSION:-}" ]; then
    echo "deploy/start.sh is a bash script: run it with bash (5.1 or newer)" >&2
    exit 1
fi
if (( BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 501 )); then  # wait -n -p, below
    echo "deploy/start.sh needs bash 5.1 or newer; this is bash $BASH_VERSION" >&2
    exit 1
fi
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
# Keep the terminal's stdin for the console bot: a background job's own stdin would be /dev/null.
exec 3<&0

# -- settings: the environment, then ./.env, then defaults shared by all three processes ----------------------
# .env is read as the bot reads it (read_env_file in bot/settings.py), not sourced: KEY=VALUE lines (blank lines,
# comment lines and `export ` allowed); quotes around the whole value are removed, else ` #` starts a comment;
# nothing is expanded. A variable already in the environment keeps its value; the last of repeated keys wins.
strip() { REPLY=${1#"${1%%[![:space:]]*}"}; REPLY=${REPLY%"${REPLY##*[![:space:]]}"}; }
load_env_file() {
    local _line _key _value _q
    local -A _from_file=()
    while IFS= read -r _line || [[ -n $_line ]]; do
        strip "$_line"
        _line=$REPLY
        [[ -z $_line || $_line == "#"* || $_line != *=* ]] && continue
        _line=${_line#"export "}
        strip "${_line%%=*}"
        _key=$REPLY
        strip "${_line#*=}"
        _value=$REPLY
        _q=${_value:0:1}
        if (( ${#_value} >= 2 )) && [[ ($_q == "'" || $_q == '"') && ${_value: -1} == "$_q" ]]; then
            _value=${_value:1:${#_value}-2}
        else
            strip "${_value%%[[:space:]]#*}"
            _value=$REPLY
        fi
        if [[ ! $_key =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then
            echo "$1: skipping '$_key': not a variable name" >&2
            continue
        fi
        [[ -v $_key && ! -v _from_file[$_key] ]] && continue  # set by the caller: the environment wins
        _from_file[$_key]=1
        export "$_key=$_value"
    done <"$1"
}
if [[ -f .env ]]; then
    load_env_file .env
fi
export CHECKPOINT_DIR=${CHECKPOINT_DIR:-$ROOT/var/checkpoints}
export CORPUS_DIR=${CORPUS_DIR:-$ROOT/data/chinese-poetry}
export DATABASE_PATH=${DATABASE_PATH:-$ROOT/var/bot.db}
export TIMEZONE=${TIMEZONE:-Asia/Shanghai}
export DEVICE=${DEVICE:-auto}
export LOG_LEVEL=${LOG_LEVEL:-INFO}
ENGINE_HOST=${ENGINE_HOST:-127.0.0.1}
ENGINE_PORT=${ENGINE_PORT:-8080}
# The bot talks to the engine started here unless ENGINE_URL points elsewhere.
client_host=$ENGINE_HOST
[[ $client_host == 0.0.0.0 ]] && client_host=127.0.0.1
export ENGINE_URL=${ENGINE_URL:-http://$client_host:$ENGINE_PORT}
mkdir -p var/log "$CHECKPOINT_DIR" "$(dirname "$DATABASE_PATH")"

# -- install (once; again when the build files change) -----------------------------------------------------
PY=.venv/bin/python
imports() { "$PY" -c "import torch, engine, bot, trainer" 2>/dev/null; }
# A venv with neither pip nor the project is what a `python3 -m venv` that failed half-way leaves (Debian
# without python3-venv): make it again, or every run would stop at "No module named pip".
if [[ -x $PY ]] && ! "$PY" -m pip --version >/dev/null 2>&1 && ! imports; then
    echo ".venv is broken (no pip, and the project not installed): creating it again" >&2
    rm -rf .venv
fi
if [[ ! -x $PY ]]; then
    echo "creating .venv" >&2
    if ! "${PYTHON:-python3}" -m venv .venv; then
        rm -rf .venv
        echo "'${PYTHON:-python3} -m venv .venv' failed (on Debian or Ubuntu: apt-get install python3-venv)" >&2
        exit 1
    fi
fi
# Install when the project does not import, or when pyproject.toml, setup.py or the C kernels it builds
# (an editable install does not rebuild them by itself) changed since our last install.
stamp=.venv/.yinshi-installed
changed() { [[ -f $stamp ]] && for f in pyproject.toml setup.py engine/sampling/_kernels.c; do [[ $f -nt $stamp ]] && return 0; done; return 1; }
if ! imports || changed; then
    echo "installing (torch ${TORCH_VERSION:-2.13.0} first, then the project)" >&2
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
    "$PY" -m pip install -q -e .
    touch "$stamp"
fi

# -- children, and their clean shutdown ---------------------------------------------------------------------
pids=()
cleanup() {
    trap - EXIT INT TERM
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    # Give each time to finish its requests (the engine drains for up to 30 s), then insist after 35 s.
    for _ in $(seq 175); do
        alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [[ $alive == 0 ]] && break
        sleep 0.2
    done
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The bot's secrets stay with the bot (as under compose and systemd); the trainer needs no ENGINE_TOKEN either.
env -u TELEGRAM_BOT_TOKEN -u WEBHOOK_SECRET "$PY" -m engine serve --host "$ENGINE_HOST" --port "$ENGINE_PORT" \
    --checkpoints "$CHECKPOINT_DIR" >>var/log/engine.log 2>&1 &
pids+=($!)
echo "engine: pid $!, http://$client_host:$ENGINE_PORT (log var/log/engine.log)" >&2

declare -A role
export RETRAIN_HOOK=${RETRAIN_HOOK-trainer.spool:bot_retrain}  # the bot's /retrain asks the trainer daemon
role[${pids[0]}]=engine
if [[ ${YINSHI_NO_TRAINER:-0} == 1 ]]; then
    echo "trainer: not started (YINSHI_NO_TRAINER=1)" >&2
elif "$PY" -c 'import os, sys; from trainer.spool import daemon_running; sys.exit(not daemon_running(os.environ["CHECKPOINT_DIR"]))'; then
    echo "trainer: a daemon already serves $CHECKPOINT_DIR (e.g. the systemd unit); not starting another" >&2
else
    env -u TELEGRAM_BOT_TOKEN -u WEBHOOK_SECRET -u ENGINE_TOKEN "$PY" -m trainer schedule >>var/log/trainer.log 2>&1 &
    pids+=($!)
    role[$!]=trainer
    echo "trainer: pid $!, '${RETRAIN_CRON:-15 3 * * *}' in $TIMEZONE (log var/log/trainer.log)" >&2
fi

# Wait for the engine to load a model, so the first poem does not meet "busy"; give up if it dies.
if ! "$PY" - "$ENGINE_URL/readyz" "${pids[0]}" <<'EOF'
import os, sys, time, urllib.request
deadline = time.monotonic() + 180
while time.monotonic() < deadline:
    try:
        os.kill(int(sys.argv[2]), 0)
    except ProcessLookupError:
        sys.exit(1)
    try:
        urllib.request.urlopen(sys.argv[1], timeout=2)
        sys.exit(0)
    except Exception:
        time.sleep(0.5)
sys.exit(1)
EOF
then
    echo "the engine is not ready (exited, or no model loaded within 180 s); the end of var/log/engine.log:" >&2
    tail -n 20 var/log/engine.log >&2 || true
    exit 1
fi

if [[ -n ${TELEGRAM_BOT_TOKEN:-} ]]; then
    echo "bot: Telegram (python -m bot run)" >&2
    "$PY" -m bot run <&3 &
else
    echo "bot: no TELEGRAM_BOT_TOKEN, local console chat (python -m bot console); try /poem 月, Ctrl-D to quit" >&2
    "$PY" -m bot console <&3 &
fi
pids+=($!)
role[$!]=bot
# Whichever child ends first ends the whole service: the bot on its own (console: end of input), or a
# crashed engine or trainer — better stopped and visible than half running.
set +e
wait -n -p ended "${pids[@]}"
status=$?
[[ ${role[$ended]} != bot ]] && echo "${role[$ended]} exited with status $status; stopping (see var/log/)" >&2
exit "$status"
