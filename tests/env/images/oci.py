"""Writes a container image as an OCI image-layout archive, with no daemon and no registry.

    python3 oci.py --name recsys.local/recsys-operator:0123abcd --out image.tar \
        --layer base-rootfs/ --layer app-rootfs/ --entrypoint /usr/local/bin/recsys-operator \
        --user 65532:65532

Each --layer folder becomes one uncompressed layer, in order. The archive is reproducible:
entries are sorted, owned by root (uid/gid 0) unless --owner says otherwise, and dated at
--mtime (default 0), so the same folders give the same digests on any machine. `ctr images
import` reads it (the name comes from the `io.containerd.image.name` annotation), as does
`skopeo copy oci-archive:`; the tests import it into the real node's containerd.

Prints the image's manifest digest and the size of each layer as JSON.
"""

import argparse
import hashlib
import io
import json
import os
import sys
import tarfile

LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


def layer_tar(root: str, mtime: int, owners: dict) -> bytes:
    """A tar of the folder `root` (its contents at /), deterministic."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        paths = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(dirnames + filenames):
                paths.append(os.path.join(dirpath, name))
        for path in sorted(paths):
            rel = os.path.relpath(path, root)
            info = tar.gettarinfo(path, arcname=rel)
            info.mtime = mtime
            uid, gid = owners.get("/" + rel, (0, 0))
            info.uid, info.gid = uid, gid
            info.uname = info.gname = ""
            if info.isreg():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return buf.getvalue()


def blob(data: bytes) -> tuple[str, bytes]:
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="full image name with tag")
    p.add_argument("--out", required=True, help="archive to write")
    p.add_argument("--layer", action="append", required=True, help="folder of one layer")
    p.add_argument("--entrypoint", action="append", default=[], help="entrypoint word")
    p.add_argument("--cmd", action="append", default=[], help="default argument")
    p.add_argument("--user", default="65532:65532")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE")
    p.add_argument("--label", action="append", default=[], help="KEY=VALUE")
    p.add_argument("--workdir", default="/")
    p.add_argument(
        "--owner",
        action="append",
        default=[],
        help="/path=UID:GID, owner of one entry (default root)",
    )
    p.add_argument("--mtime", type=int, default=0)
    a = p.parse_args()

    owners = {}
    for spec in a.owner:
        path, ids = spec.split("=", 1)
        uid, gid = ids.split(":", 1)
        owners[path.rstrip("/")] = (int(uid), int(gid))

    layers = []
    for folder in a.layer:
        if not os.path.isdir(folder):
            print(f"oci.py: --layer {folder}: not a folder", file=sys.stderr)
            return 2
        layers.append(blob(layer_tar(folder, a.mtime, owners)))

    env = ["PATH=/usr/local/bin:/usr/bin:/bin"] + a.env
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": a.user,
            "Env": env,
            "Entrypoint": a.entrypoint or None,
            "Cmd": a.cmd or None,
            "WorkingDir": a.workdir,
            "Labels": dict(kv.split("=", 1) for kv in a.label) or None,
        },
        "rootfs": {"type": "layers", "diff_ids": [d for d, _ in layers]},
        "history": [{"created_by": f"oci.py --layer {os.path.basename(os.path.normpath(f))}"} for f in a.layer],
    }
    config["config"] = {k: v for k, v in config["config"].items() if v is not None}
    config_digest, config_bytes = blob(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": config_digest, "size": len(config_bytes)},
        "layers": [{"mediaType": LAYER_TYPE, "digest": d, "size": len(b)} for d, b in layers],
    }
    manifest_digest, manifest_bytes = blob(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode())
    tag = a.name.rsplit(":", 1)[1] if ":" in a.name.rsplit("/", 1)[-1] else "latest"
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": MANIFEST_TYPE,
                "digest": manifest_digest,
                "size": len(manifest_bytes),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {
                    "io.containerd.image.name": a.name,
                    "org.opencontainers.image.ref.name": tag,
                },
            }
        ],
    }

    tmp = a.out + ".tmp"
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        add_bytes(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add_bytes(tar, "index.json", json.dumps(index, sort_keys=True).encode())
        seen = set()
        for digest, data in [(config_digest, config_bytes), (manifest_digest, manifest_bytes)] + layers:
            if digest in seen:
                continue
            seen.add(digest)
            add_bytes(tar, "blobs/sha256/" + digest.split(":", 1)[1], data)
    os.replace(tmp, a.out)
    print(
        json.dumps(
            {
                "name": a.name,
                "manifest": manifest_digest,
                "layers": [{"digest": d, "bytes": len(b)} for d, b in layers],
                "bytes": sum(len(b) for _, b in layers),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
