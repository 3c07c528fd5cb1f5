#!/bin/sh
# Local stand-ins for the base images docker-compose.yml and the Dockerfiles name, where no registry is reachable:
# python:3.11-slim from debootstrap, redis:7 from Debian's redis-server, prom/prometheus from Debian's prometheus.
# Usage: DOCKER_HOST=unix://... stand_ins.sh WORKDIR  (an image already there is kept: local runs reuse it)
set -eu
work=$1
mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
[ -n "$mirror" ] || mirror=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null)
[ -n "$mirror" ] || mirror=http://deb.debian.org/debian
have() { docker image inspect "$1" >/dev/null 2>&1; }
if ! have python:3.11-slim; then
  root=$work/rootfs
  rm -rf "$root"
  debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1
  # the machine's extra CA certificates, so pip reaches PyPI from inside a build; pip installs system-wide as in
  # the real image; `python` and `pip` as the real image names them
  cp /usr/local/share/ca-certificates/* "$root/usr/local/share/ca-certificates/" 2>/dev/null || true
  chroot "$root" update-ca-certificates >/dev/null 2>&1
  rm -f "$root"/usr/lib/python3.*/EXTERNALLY-MANAGED
  ln -sf python3 "$root/usr/bin/python"; ln -sf pip3 "$root/usr/bin/pip"
  rm -rf "$root/var/cache/apt/archives/"*.deb
  tar -C "$root" -c . | docker import -c 'ENV PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin' -c 'CMD ["python3"]' - python:3.11-slim >/dev/null
  rm -rf "$root"
fi
build() {  # tag, then Dockerfile lines on stdin
  have "$1" || docker build -q --network host -t "$1" - >/dev/null
}
build redis:7 <<'DF'
FROM python:3.11-slim
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server && rm -rf /var/lib/apt/lists/* && mkdir -p /data \
 && printf '#!/bin/sh\n[ "$1" = redis-server ] && { shift; exec redis-server "$@" --protected-mode no; }\nexec "$@"\n' >/usr/local/bin/docker-entrypoint.sh \
 && chmod +x /usr/local/bin/docker-entrypoint.sh
WORKDIR /data
# as the official image: protected mode off (the network is the compose project's own; no port is published)
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["redis-server"]
DF
build prom/prometheus:v2.55.1 <<'DF'
FROM python:3.11-slim
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus wget && rm -rf /var/lib/apt/lists/* && mkdir -p /prometheus
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
DF
