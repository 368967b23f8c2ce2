# Sourced by scripts/run.sh: exports AUTH_SECRET and sets FLOWER_PASSWORD, each taken from the
# environment or else generated once into $RUN_DIR (default .run) and read back from there.
# Anyone who can read the signing secret can sign a token for any user, so from here on every
# file the run creates is its owner's alone (umask 077): the secrets are 0600 in a 0700
# directory, and files an older run.sh left readable are made so too.
RUN_DIR=${RUN_DIR:-.run}
PYTHON=${PYTHON:-.venv/bin/python}
umask 077
mkdir -p "$RUN_DIR"
chmod 700 "$RUN_DIR"

# secret NAME EXPRESSION: the contents of $RUN_DIR/NAME, first written as the Python EXPRESSION.
secret() {
    local path="$RUN_DIR/$1"
    [ -s "$path" ] || "$PYTHON" -c "import secrets; print($2)" > "$path"
    chmod 600 "$path"
    cat "$path"
}

if [ -z "${AUTH_SECRET:-}" ]; then
    AUTH_SECRET=$(secret auth_secret 'secrets.token_hex(32)')
fi
export AUTH_SECRET
if [ -z "${FLOWER_PASSWORD:-}" ]; then
    FLOWER_PASSWORD=$(secret flower_password 'secrets.token_urlsafe(24)')
fi
