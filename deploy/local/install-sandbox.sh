#!/usr/bin/env bash
# Prepares this host for `agenttask serve --backend local` (the bubblewrap sandbox).
#
# Idempotent; run as root:   sudo deploy/local/install-sandbox.sh
#
# What it does:
#   1. installs bubblewrap, python3 and R (r-base-core) from Debian/Ubuntu packages;
#   2. creates the unprivileged system group and user `agenttask-sandbox` and the uid range
#      `agenttask-sandbox-0` ... `agenttask-sandbox-<N-1>` (N = AGENTTASK_SANDBOX_SLOTS, default
#      64; no home, nologin shell, locked, primary group `agenttask-sandbox`). Each running task
#      runs as one of them, never two at once, so even a sandbox escape has no rights and the
#      kernel's per-user limits are per task; N bounds how many tasks this host runs at once;
#   3. checks that user namespaces can be created (bubblewrap needs them) and enables them where a
#      sysctl disables them;
#   4. checks that cgroups are usable (v1 or v2) and says what the backend will fall back to if not.
set -euo pipefail

SANDBOX_USER="${AGENTTASK_SANDBOX_USER:-agenttask-sandbox}"
SANDBOX_SLOTS="${AGENTTASK_SANDBOX_SLOTS:-64}"
PACKAGES=(bubblewrap python3 r-base-core)

log()  { printf 'install-sandbox: %s\n' "$*"; }
warn() { printf 'install-sandbox: WARNING: %s\n' "$*" >&2; }
die()  { printf 'install-sandbox: ERROR: %s\n' "$*" >&2; exit 1; }

[[ "$(id -u)" -eq 0 ]] || die "run as root (it installs packages and creates a system user)"
command -v apt-get >/dev/null || die "apt-get not found: install ${PACKAGES[*]} with your package manager and create the system user ${SANDBOX_USER} by hand"

# 1. Packages. `apt-get update` only when something is missing and the package lists are empty or
#    cannot resolve it.
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends "${missing[@]}"; then
        log "apt-get install failed; running apt-get update and retrying"
        apt-get update
        apt-get install -y --no-install-recommends "${missing[@]}"
    fi
else
    log "packages already installed: ${PACKAGES[*]}"
fi
for bin in /usr/bin/bwrap /usr/bin/python3 /usr/bin/Rscript; do
    [[ -x "$bin" ]] || die "$bin is missing after installation"
done

# 2. The sandbox user: a system account with no home directory and no login shell.
if getent passwd "$SANDBOX_USER" >/dev/null; then
    log "user $SANDBOX_USER exists (uid $(id -u "$SANDBOX_USER"))"
else
    nologin="$(command -v nologin || echo /usr/sbin/nologin)"
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell "$nologin" --comment "AgentTask sandboxed programs" "$SANDBOX_USER"
    log "created system user $SANDBOX_USER (uid $(id -u "$SANDBOX_USER"))"
fi
# The account must never be usable for a login, whatever happened before.
passwd -l "$SANDBOX_USER" >/dev/null 2>&1 || true

# 2b. The uid range: one user per task that may run at once, all in the group $SANDBOX_USER. The
#     service leases them with a host-wide lock (/run/agenttask/uids) and refuses to start
#     without at least $SANDBOX_USER-0. Existing users are kept; the range only grows.
[[ "$SANDBOX_SLOTS" =~ ^[0-9]+$ ]] && ((SANDBOX_SLOTS >= 1 && SANDBOX_SLOTS <= 4096)) ||
    die "AGENTTASK_SANDBOX_SLOTS must be 1..4096 (got $SANDBOX_SLOTS)"
nologin="$(command -v nologin || echo /usr/sbin/nologin)"
created=0
for ((i = 0; i < SANDBOX_SLOTS; i++)); do
    name="$SANDBOX_USER-$i"
    getent passwd "$name" >/dev/null && continue
    useradd --system --gid "$SANDBOX_USER" --no-create-home --home-dir /nonexistent \
        --shell "$nologin" --comment "AgentTask sandbox slot $i" "$name"
    passwd -l "$name" >/dev/null 2>&1 || true
    created=$((created + 1))
done
log "sandbox uid range: $SANDBOX_USER-0 ... $SANDBOX_USER-$((SANDBOX_SLOTS - 1)) ($created created)"
install -d -m 0700 -o root -g root /run/agenttask /run/agenttask/uids

# 3. Unprivileged user namespaces: bubblewrap runs as the sandbox user (not setuid) and creates a
#    user namespace, so the kernel must allow it.
if [[ -e /proc/sys/kernel/unprivileged_userns_clone ]] &&
   [[ "$(cat /proc/sys/kernel/unprivileged_userns_clone)" != 1 ]]; then
    log "enabling kernel.unprivileged_userns_clone"
    sysctl -w kernel.unprivileged_userns_clone=1 >/dev/null || warn "could not set kernel.unprivileged_userns_clone=1"
    echo 'kernel.unprivileged_userns_clone = 1' > /etc/sysctl.d/60-agenttask-userns.conf || true
fi
if [[ -e /proc/sys/user/max_user_namespaces ]] &&
   [[ "$(cat /proc/sys/user/max_user_namespaces)" -lt 1000 ]]; then
    log "raising user.max_user_namespaces to 15000"
    sysctl -w user.max_user_namespaces=15000 >/dev/null || warn "could not raise user.max_user_namespaces"
    echo 'user.max_user_namespaces = 15000' > /etc/sysctl.d/60-agenttask-userns-max.conf || true
fi
# Ubuntu 24.04+ restricts unprivileged user namespaces through AppArmor.
if [[ -e /proc/sys/kernel/apparmor_restrict_unprivileged_userns ]] &&
   [[ "$(cat /proc/sys/kernel/apparmor_restrict_unprivileged_userns)" == 1 ]]; then
    warn "kernel.apparmor_restrict_unprivileged_userns=1: bubblewrap needs an AppArmor profile allowing 'userns' (Ubuntu ships one for /usr/bin/bwrap in apparmor-profiles; or set the sysctl to 0)"
fi
if setpriv --reuid="$SANDBOX_USER" --regid="$SANDBOX_USER" --clear-groups \
        /usr/bin/bwrap --unshare-all --ro-bind /usr /usr --symlink usr/lib /lib \
        --symlink usr/lib64 /lib64 --symlink usr/bin /bin /bin/true 2>/tmp/agenttask-bwrap-check.$$; then
    log "bubblewrap works as $SANDBOX_USER (unprivileged user namespaces are available)"
else
    warn "bubblewrap failed as $SANDBOX_USER: $(cat /tmp/agenttask-bwrap-check.$$)"
    warn "unprivileged user namespaces look disabled; the local backend will not start until they work"
fi
rm -f /tmp/agenttask-bwrap-check.$$

# 4. Cgroups (limits for memory, processes and CPU). The backend detects v2 or v1 at run time and
#    falls back to rlimits alone when it cannot create cgroups; say which it will get.
if [[ -f /sys/fs/cgroup/cgroup.controllers ]]; then
    log "cgroup v2 found (controllers: $(cat /sys/fs/cgroup/cgroup.controllers))"
elif [[ -d /sys/fs/cgroup/memory && -d /sys/fs/cgroup/pids ]]; then
    log "cgroup v1 found (memory, pids$( [[ -d /sys/fs/cgroup/cpu ]] && echo ', cpu'))"
else
    warn "no usable cgroup hierarchy: per-task memory/process limits fall back to rlimits only"
fi
log "done"
