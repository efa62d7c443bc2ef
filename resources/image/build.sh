#!/bin/bash
# Builds podvm's container image as an OCI image layout, without a container engine (CI has
# no registry to pull resources/Containerfile's base images from, and no daemon): the same
# image the Containerfile describes, from the same static binary.
#
#   resources/image/build.sh [OUT]        (default target/image)
#
# OUT/oci is the layout, with two tags:
#   podvm  the static podvm at /podvm, /var/run/podvm owned by 107, USER 107:107,
#          ENTRYPOINT ["/podvm"], CMD ["--help"], WORKDIR /var/run/podvm;
#   demo   the same plus the test guest (Debian's cloud kernel and the busybox initramfs)
#          at /usr/share/podvm/guest/, for resources/examples/demo-vm.yaml.
# Copy it to a registry with `skopeo copy oci:OUT/oci:podvm docker://REGISTRY/podvm:TAG`.
# Needs umoci and tar (Debian packages umoci, tar) and, for the demo tag, target/guest
# (tests/guest/build.sh).
set -euo pipefail
cd "$(dirname -- "${BASH_SOURCE[0]}")/../.."
out=${1:-target/image}
for tool in umoci tar; do
    command -v "$tool" >/dev/null || {
        echo "image: needs $tool (apt-get install $tool)" >&2
        exit 1
    }
done

# The static binary: glibc linked in, so the C library the seccomp filters were written
# against travels with it.
RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked -p launcher --target x86_64-unknown-linux-gnu
bin=target/x86_64-unknown-linux-gnu/release/podvm
if readelf -l "$bin" | grep -q INTERP || readelf -d "$bin" | grep -q NEEDED; then
    echo "image: $bin is not static" >&2
    exit 1
fi

rm -rf "$out"
mkdir -p "$out/root/var/run/podvm" "$out/demo/usr/share/podvm/guest"
install -m 0755 "$bin" "$out/root/podvm"
# Reproducible layers: fixed owner (107 for what podvm writes to), times and order.
layer() {
    tar --create --file "$2" --directory "$1" --numeric-owner --owner=0 --group=0 \
        --mtime=@0 --sort=name --format=posix --pax-option=delete=atime,delete=ctime \
        --exclude=./var/run/podvm .
    if [[ -d $1/var/run/podvm ]]; then
        tar --append --file "$2" --directory "$1" --numeric-owner --owner=107 --group=107 \
            --mtime=@0 --format=posix --pax-option=delete=atime,delete=ctime \
            --no-recursion ./var/run/podvm
    fi
}
layer "$out/root" "$out/podvm.tar"

oci=$out/oci
umoci init --layout "$oci"
umoci new --image "$oci:podvm"
umoci raw add-layer --image "$oci:podvm" "$out/podvm.tar"
umoci config --image "$oci:podvm" --no-history \
    --config.user 107:107 \
    --config.entrypoint /podvm --config.cmd --help \
    --config.workingdir /var/run/podvm \
    --config.label org.opencontainers.image.title=podvm \
    --config.label "org.opencontainers.image.description=podvm: a KVM VMM in a pod" \
    --architecture amd64 --os linux

guest=${PODVM_GUEST_DIR:-target/guest}
if [[ -f $guest/vmlinuz && -f $guest/initramfs.cpio.gz ]]; then
    install -m 0644 "$guest/vmlinuz" "$guest/initramfs.cpio.gz" "$out/demo/usr/share/podvm/guest/"
    layer "$out/demo" "$out/demo.tar"
    umoci config --image "$oci:podvm" --tag demo --no-history
    umoci raw add-layer --image "$oci:demo" "$out/demo.tar"
else
    echo "image: no test guest in $guest (tests/guest/build.sh); the demo tag is not built" >&2
fi
rm -rf "$out/root" "$out/demo" "$out"/*.tar
umoci ls --layout "$oci"
