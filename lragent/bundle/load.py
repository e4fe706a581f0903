"""Loading bundles with full validation: every problem is one BundleError line; nothing is unpickled.

The bundle directory is opened once; every file is read through that handle (``openat`` with ``O_NOFOLLOW``, so no
symbolic link inside the bundle is followed), and each file is read exactly once: its sha256 and its tensors come
from the same bytes. A concurrent ``--force`` replacement (an atomic exchange of directories) therefore shows the
old bundle or the new one, never a mix; if the old one is deleted under the reader, the load is retried once on the
new one, and a second failure says "replaced while reading" rather than "corrupted".
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from .basefp import check_base
from .fields import parse_manifest
from .fsutil import MARKER
from lragent.modes import BY_NAME

from .format import ALLOWED_SUFFIXES, PICKLE_SUFFIXES, Bundle, BundleError, validate_role_name
from .peftcheck import check_peft_copies
from .peftlayout import base_layer_count


class BundleDir:
    """A bundle directory opened once (``O_DIRECTORY``); files are read relative to it, never through a link."""

    def __init__(self, root: Path):
        self.root = root
        try:
            self.fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            raise BundleError(f"bundle {root} is not a directory: pass the directory written by 'lragent export'") \
                from None

    def close(self) -> None:
        """Release the directory handle."""
        os.close(self.fd)

    def replaced(self) -> bool:
        """True when the path no longer names the directory that was opened (or it was deleted)."""
        try:
            st, fst = os.stat(self.root), os.fstat(self.fd)
        except OSError:
            return True
        return (st.st_ino, st.st_dev) != (fst.st_ino, fst.st_dev) or fst.st_nlink == 0

    def read(self, rel: str) -> bytes:
        """The bytes of the regular file ``rel`` inside the bundle; BundleError for a link or a non-file."""
        parts, fds = rel.split("/"), []
        try:
            fd = self.fd
            for i, p in enumerate(parts):
                last = i == len(parts) - 1
                flags = os.O_RDONLY | os.O_NOFOLLOW | (0 if last else os.O_DIRECTORY)
                try:
                    fd = os.open(p, flags, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENXIO):
                        raise BundleError(f"{self.root}/{rel} is a symbolic link or not a plain file: bundles hold "
                                          f"plain files only (a link may point out of the bundle); re-export it") \
                            from None
                    raise
                fds.append(fd)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise BundleError(f"{self.root}/{rel} is not a plain file: re-export the bundle")
            chunks = []
            while chunk := os.read(fd, 1 << 24):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            for fd in fds:
                os.close(fd)

    def walk(self) -> tuple[set[str], dict[str, str]]:
        """(relative paths of the files on disk, {relative path of a symbolic link: its target}). The writer's marker
        of a bundle still being written (:data:`fsutil.MARKER`, present while ``verify`` runs) is not a file of it."""
        files, links = set(), {}
        for dirpath, dirnames, filenames, dirfd in os.fwalk(".", dir_fd=self.fd):   # does not follow links
            rel = Path(dirpath)
            for n in filenames + dirnames:
                st = os.stat(n, dir_fd=dirfd, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    links[(rel / n).as_posix()] = os.readlink(n, dir_fd=dirfd)
                elif not stat.S_ISDIR(st.st_mode):
                    files.add((rel / n).as_posix())
        return files - {"manifest.json", MARKER}, links


def _check_rel(root: Path, rel) -> None:
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts or \
            rel.startswith("./") or "//" in rel:
        raise BundleError(f"manifest path {rel!r} escapes the bundle directory {root}: paths must be relative, no '..'")


def _manifest_from(d: BundleDir) -> dict:
    root = d.root
    path = root / "manifest.json"
    try:
        raw = d.read("manifest.json")
    except FileNotFoundError:
        raise BundleError(f"bundle {root} has no manifest.json: it is not an lragent bundle (or was half-written)") \
            from None
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON ({str(e).splitlines()[0]})") from None
    from .format import FORMAT_NAME, FORMAT_VERSION
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise BundleError(f"{path}: format is {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                          f"expected {FORMAT_NAME!r}")
    if manifest.get("version") != FORMAT_VERSION:
        raise BundleError(f"{path}: unknown bundle format version {manifest.get('version')!r}; this lragent reads "
                          f"version {FORMAT_VERSION} (upgrade lragent or re-export the bundle)")
    return manifest


def read_manifest(bundle_dir: str | Path) -> dict:
    """The parsed ``manifest.json`` of a bundle (format and version checked; a link is refused)."""
    d = BundleDir(Path(bundle_dir).absolute())
    try:
        return _manifest_from(d)
    except OSError as e:
        raise BundleError(f"cannot read {d.root}/manifest.json ({e.strerror})") from None
    finally:
        d.close()


def _check_files(d: BundleDir, files: dict, peft: dict, roles: list[str], share_a: list) -> None:
    root = d.root
    for rel in list(files) + list(peft.values()):
        _check_rel(root, rel)
    on_disk, links = d.walk()
    for rel, target in sorted(links.items()):
        full = (root / rel).parent / target
        inside = root.resolve() in Path(os.path.realpath(full)).parents
        raise BundleError(f"manifest path {rel!r} escapes the bundle directory {root} (through a link)" if not inside
                          else f"{root}/{rel} is a symbolic link: bundles hold plain files only; re-export the bundle")
    for rel in sorted(on_disk | set(files)):
        if rel.endswith(PICKLE_SUFFIXES) or not rel.endswith(ALLOWED_SUFFIXES):
            raise BundleError(f"{root}/{rel} is not a safetensors or JSON file; bundles hold safetensors weights only "
                              f"(lragent never unpickles): remove it or re-export the bundle")
    missing = sorted(set(files) - on_disk)
    if missing:
        raise BundleError(f"bundle {root} is missing {missing[0]} (listed in manifest.json): re-export the bundle")
    extra = sorted(on_disk - set(files))
    if extra:
        raise BundleError(f"bundle {root} has an unlisted file {extra[0]}: remove it or re-export the bundle")
    expected = {f"roles/{r}.safetensors" for r in roles} | ({"shared_a.safetensors"} if share_a else set())
    expected |= {f"peft/{r}/{n}" for r in roles for n in ("adapter_config.json", "adapter_model.safetensors")}
    if set(files) != expected:
        odd = sorted(set(files) ^ expected)[0]
        raise BundleError(f"{root}/manifest.json: file list does not match roles {roles} "
                          f"({odd} is {'unexpected' if odd in files else 'not listed'}): re-export the bundle")


def _tensors(root: Path, rel: str, data: bytes, suffix_ok: tuple[str, ...]) -> dict:
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise BundleError(f"{root}/{rel} is not a readable safetensors file ({str(e).splitlines()[0][:120]})") \
            from None
    bad = [k for k in tensors if not k.endswith(suffix_ok)]
    if bad:
        raise BundleError(f"{root}/{rel} holds an unexpected tensor {bad[0]!r} (expected names ending in {suffix_ok})")
    return tensors


def _check_manifest_matches(root: Path, m: dict, bundle: Bundle) -> None:
    where = f"{root}/manifest.json"
    if m["modules"] is not None and sorted(m["modules"]) != bundle.modules:
        raise BundleError(f"{where}: lora.modules do not match the modules in the tensor files: re-export")
    if m["scaling"] is not None and not abs(m["scaling"] - bundle.scaling) <= 1e-9 * abs(bundle.scaling):
        raise BundleError(f"{where}: lora.scaling {m['scaling']} != {bundle.scaling} from rank/alpha/rule")
    # modes: a bundle written by another lragent version may list fewer or unknown modes; what it lists must not
    # claim a mode that needs shared A when the tensors do not share it
    claims = [x for x in (m["modes"] or []) if x in BY_NAME and BY_NAME[x].needs_shared_a]
    if m["lrshared_ok"] not in (None, bundle.lrshared_ok) or (claims and not bundle.lrshared_ok):
        raise BundleError(f"{where}: lrshared_ok/modes do not match share_a {bundle.share_a}: re-export")
    dtype = str(bundle.b(bundle.modules[0], bundle.roles[0]).dtype).replace("torch.", "")
    if m["dtype"] not in (None, dtype):
        raise BundleError(f"{where}: dtype {m['dtype']!r} does not match the tensors ({dtype}): re-export")
    if m["a_family_hash"] != bundle.a_family_hash:
        raise BundleError(f"{where}: a_family_hash does not match the shared A tensors; re-export")


def _load_once(d: BundleDir, verify: bool, base_dir=None) -> Bundle:
    root = d.root
    manifest = _manifest_from(d)
    m = parse_manifest(manifest, f"{root}/manifest.json")
    roles = [validate_role_name(r) for r in m["roles"]]
    _check_files(d, m["files"], m["peft"], roles, m["share_a"])
    data = {rel: d.read(rel) for rel in sorted(m["files"])}
    if verify:
        for rel, digest in m["files"].items():
            if hashlib.sha256(data[rel]).hexdigest() != digest:
                raise BundleError(f"{root}/{rel}: sha256 does not match manifest.json (corrupted or modified); "
                                  f"re-export the bundle")
    shared_a = {}
    if m["share_a"]:
        rel = "shared_a.safetensors"
        shared_a = {k[: -len(".lora_A")]: v for k, v in _tensors(root, rel, data[rel], (".lora_A",)).items()}
    role_a, role_b = {}, {}
    for role in roles:
        rel = f"roles/{role}.safetensors"
        t = _tensors(root, rel, data[rel], (".lora_A", ".lora_B"))
        role_b[role] = {k[: -len(".lora_B")]: v for k, v in t.items() if k.endswith(".lora_B")}
        role_a[role] = {k[: -len(".lora_A")]: v for k, v in t.items() if k.endswith(".lora_A")}
    bundle = Bundle(roles=roles, rank=m["rank"], alpha=m["alpha"], targets=m["targets"], share_a=m["share_a"],
                    shared_a=shared_a, role_a=role_a, role_b=role_b, scaling_rule=m["scaling_rule"],
                    base=m["base"], source=m["source"], root=root)
    try:
        bundle.validate()
    except BundleError as e:
        raise BundleError(f"{root}: {e}") from None
    _check_manifest_matches(root, m, bundle)
    check_peft_copies(bundle, {rel: v for rel, v in data.items() if rel.startswith("peft/")},
                      base_layer_count(bundle.base, base_dir))
    return bundle


def load_bundle(bundle_dir: str | Path, *, base_dir: str | Path | None = None, verify: bool = True) -> Bundle:
    """Load and validate a bundle. ``base_dir``: the base model to be used with it; it must be the base the manifest
    records (config sha256, and the weights fingerprint where recorded; see :func:`check_base`). ``verify``: check
    the sha256 of every listed file. Reads nothing but JSON and safetensors; raises :class:`BundleError` (one line)
    on the first problem and never writes."""
    root = Path(bundle_dir).absolute()
    for attempt in range(2):
        d = BundleDir(root)
        try:
            bundle = _load_once(d, verify, base_dir)
            break
        except (BundleError, OSError) as e:
            if d.replaced():
                if attempt == 0:
                    continue
                raise BundleError(f"bundle {root} was replaced while it was being read (a concurrent 'lragent "
                                  f"export --force'?): load it again") from None
            if isinstance(e, OSError):
                raise BundleError(f"cannot read bundle {root} ({e.strerror}: {e.filename or ''})") from None
            raise
        finally:
            d.close()
    if base_dir is not None:
        check_base(bundle.base, base_dir)
    return bundle
