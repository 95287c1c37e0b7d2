#!/usr/bin/env bash
# Builds the runtime images of the controller's docker backend:
# fnrt-runtime-nodejs, fnrt-runtime-python and fnrt-runtime-rust, tagged $TAG.
#
#   runtimes/images.sh [--offline|--registry] [LANGUAGE...]
#
# --registry  `docker build` (or `podman build`) of runtimes/LANG/Dockerfile:
#             self-contained images on public base images, for deployments
#             that reach a registry.
# --offline   no registry needed: each image is an empty rootfs holding only
#             the runtime server (/opt/fnrt/), /etc/passwd and /etc/group and
#             empty mount points, imported with `podman import`. The
#             interpreter and its libraries come from the host: a container
#             needs the paths in its io.fnrt.host-mounts label bind-mounted
#             read-only. The default when no registry answers.
#
# Images are labelled (docs/containers.md): io.fnrt.runtime,
# io.fnrt.command (JSON array, the server's command without --socket),
# io.fnrt.host-mounts (offline only) and io.fnrt.content (a hash of what went
# in; an image whose hash matches is not built again).
#
# The CLI is docker when it reaches a daemon, else podman (for --offline,
# podman first); the Docker-API socket ($DOCKER_HOST, else Podman's
# /run/podman/podman.sock) must answer, as the controller will use it.
set -euo pipefail

TAG="0.1"
PREFIX="fnrt-runtime-"
HOST_MOUNTS=(/usr /lib /lib64)
FNRT_UID=65532
FNRT_GID=65532

root="$(cd "$(dirname "$0")/.." && pwd)"
die() { echo "images.sh: $*" >&2; exit 1; }
work=""
trap '[ -z "$work" ] || rm -rf "$work"' EXIT

mode=""
langs=()
for arg in "$@"; do
  case "$arg" in
    --offline) mode=offline ;;
    --registry) mode=registry ;;
    nodejs | python | rust) langs+=("$arg") ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$arg' (usage: $0 [--offline|--registry] [nodejs|python|rust]...)" ;;
  esac
done
[ ${#langs[@]} -gt 0 ] || langs=(nodejs python rust)

if [ -z "$mode" ]; then
  # The Dockerfiles' base images are on Docker Hub: 401 means it answers.
  code="$(curl -s -m 5 -o /dev/null -w '%{http_code}' https://registry-1.docker.io/v2/ || true)"
  case "$code" in 200 | 401) mode=registry ;; *) mode=offline ;; esac
  echo "images.sh: no mode given; registry $([ "$mode" = registry ] && echo answers || echo unreachable): --$mode"
fi

# The container engine: its API socket must answer, and a CLI must be there.
socket="${DOCKER_HOST:-unix:///run/podman/podman.sock}"
case "$socket" in
  unix://*) socket_path="${socket#unix://}" ;;
  *) die "DOCKER_HOST=$socket: only unix:// sockets are supported" ;;
esac
command -v curl >/dev/null || die "curl is missing"
if ! curl -sf -m 5 --unix-socket "$socket_path" http://d/_ping >/dev/null 2>&1; then
  die "no container engine answers on $socket_path (Podman: podman system service --time=0 unix://$socket_path &; see docs/containers.md)"
fi
docker_ok() { command -v docker >/dev/null && DOCKER_HOST="$socket" docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }
cli=""
if [ "$mode" = offline ] && command -v podman >/dev/null; then
  cli=podman
elif docker_ok; then
  cli=docker
elif command -v podman >/dev/null; then
  cli=podman
fi
[ -n "$cli" ] || die "neither podman nor docker is installed (apt-get install podman runc; see docs/containers.md)"
if [ "$cli" = docker ]; then
  export DOCKER_HOST="$socket"
fi

label_of() { # IMAGE LABEL: the label's value, empty when the image or label is missing
  "$cli" image inspect --format "{{index .Config.Labels \"$2\"}}" "$1" 2>/dev/null | sed 's/^<no value>$//' || true
}

json_array() { # ARG...: a JSON array of strings (no quotes or backslashes expected)
  local out="" a
  for a in "$@"; do
    case "$a" in *'"'* | *\\*) die "cannot quote '$a'" ;; esac
    out+="${out:+,}\"$a\""
  done
  printf '[%s]' "$out"
}

# An interpreter the container can run: its real path, which must lie
# under a bind-mounted host path (a pyenv shim under /root does not).
interpreter() {
  local name="$1" c p m
  for c in "$(command -v "$name" 2>/dev/null || true)" "/usr/bin/$name" "/usr/local/bin/$name"; do
    [ -n "$c" ] && [ -x "$c" ] || continue
    p="$(readlink -f "$c")"
    for m in "${HOST_MOUNTS[@]}"; do
      if [[ "$p" == "$m"/* ]]; then
        echo "$p"
        return
      fi
    done
  done
  die "no $name found whose real path is under ${HOST_MOUNTS[*]} (the offline image runs the host's)"
}

build_registry() { # LANG NAME
  local lang="$1" name="$2" context
  case "$lang" in
    rust) context="$root" ;;
    *) context="$root/runtimes/$lang" ;;
  esac
  echo "== $name: $cli build -f runtimes/$lang/Dockerfile ${context#"$root"/}"
  "$cli" build -f "$root/runtimes/$lang/Dockerfile" -t "$name" "$context"
}

build_offline() { # LANG NAME
  local lang="$1" name="$2" payload file command rootfs hash old old_id new_id m mounts=()
  case "$lang" in
    nodejs)
      payload="$root/runtimes/nodejs/server.js"
      command=("$(interpreter node)" /opt/fnrt/server.js)
      ;;
    python)
      payload="$root/runtimes/python/server.py"
      # -I: ignore PYTHON* variables and the user site (as the process backend).
      command=("$(interpreter python3)" -I /opt/fnrt/server.py)
      ;;
    rust)
      command -v cargo >/dev/null || die "cargo is missing (needed to build fnrt-runtime-rust)"
      echo "== cargo build --release -p fnrt-runtime-rust"
      (cd "$root" && cargo build -q --locked --release -p fnrt-runtime-rust)
      payload="${CARGO_TARGET_DIR:-$root/target}/release/fnrt-runtime-rust"
      [ -x "$payload" ] || die "$payload was not built"
      command=(/opt/fnrt/fnrt-runtime-rust)
      ;;
  esac
  for m in "${HOST_MOUNTS[@]}"; do
    [ -e "$m" ] && mounts+=("$m")
  done
  file="$(basename "$payload")"
  local cmd_json mounts_csv
  cmd_json="$(json_array "${command[@]}")"
  mounts_csv="$(IFS=,; echo "${mounts[*]}")"

  local passwd group
  passwd="root:x:0:0:root:/root:/usr/sbin/nologin
fnrt:x:$FNRT_UID:$FNRT_GID:fnrt:/home/function:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin"
  group="root:x:0:
fnrt:x:$FNRT_GID:
nogroup:x:65534:"

  # What the image is made of; this script is part of it.
  local changes=(
    "LABEL io.fnrt.runtime=$lang"
    "LABEL io.fnrt.command=$cmd_json"
    "LABEL io.fnrt.host-mounts=$mounts_csv"
    "ENV PATH=/usr/local/bin:/usr/bin:/bin"
    "ENV LANG=C.UTF-8"
    "ENV HOME=/home/function"
    "ENV TMPDIR=/tmp"
    "USER $FNRT_UID:$FNRT_GID"
    "WORKDIR /home/function"
    # A runtime never cleans up after itself (docs/runtime-protocol.md),
    # and as PID 1 it would ignore SIGTERM: stop it at once.
    "STOPSIGNAL SIGKILL"
  )
  hash="$({
    printf '%s\n' "${changes[@]}" "$passwd" "$group" "$file"
    sha256sum <"$payload"
    sha256sum <"${BASH_SOURCE[0]}"
  } | sha256sum | cut -c1-32)"
  old="$(label_of "$name" io.fnrt.content)"
  old_id="$("$cli" image inspect --format '{{.Id}}' "$name" 2>/dev/null || true)"
  if [ "$old" = "$hash" ]; then
    echo "== $name: up to date (io.fnrt.content=$hash)"
    return
  fi

  [ -n "$work" ] || work="$(mktemp -d)"
  rootfs="$work/$lang"
  mkdir -p "$rootfs"/{opt/fnrt,etc,usr,lib,lib64,run/runtime,home/function,proc,dev,sys}
  install -d -m 1777 "$rootfs/tmp"
  install -m "$([ "$lang" = rust ] && echo 0755 || echo 0644)" "$payload" "$rootfs/opt/fnrt/$file"
  printf '%s\n' "$passwd" >"$rootfs/etc/passwd"
  printf '%s\n' "$group" >"$rootfs/etc/group"
  chmod 0644 "$rootfs/etc/passwd" "$rootfs/etc/group"
  # The home is a mount point for a tmpfs, the runtime's cwd; runc gives a
  # tmpfs without mode= the mode of the directory it covers, and Podman 4.3
  # refuses uid=/gid= there: 1777 lets uid 65532 write to it.
  chmod 1777 "$rootfs/home/function"

  local args=() c
  [ "$cli" = docker ] || args+=(-q)
  for c in "${changes[@]}" "LABEL io.fnrt.content=$hash"; do
    args+=(--change "$c")
  done
  echo "== $name: importing (${cmd_json}, host mounts $mounts_csv)"
  tar -C "$rootfs" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -c . |
    "$cli" import "${args[@]}" - "$name" >/dev/null
  rm -rf "$rootfs"
  # The image this one replaces, unless a container still uses it.
  new_id="$("$cli" image inspect --format '{{.Id}}' "$name")"
  if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then
    "$cli" rmi "$old_id" >/dev/null 2>&1 || true
  fi
  echo "== $name: built (io.fnrt.content=$hash)"
}

echo "images.sh: --$mode with $cli on $socket_path"
for lang in "${langs[@]}"; do
  name="$PREFIX$lang:$TAG"
  case "$mode" in
    registry) build_registry "$lang" "$name" ;;
    offline) build_offline "$lang" "$name" ;;
  esac
done
