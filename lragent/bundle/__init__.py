"""Bundle v1: the one contract between training and serving.

A bundle is a directory::

    manifest.json                  format, version, base fingerprint, roles, LoRA config, A-family hash, serving
                                   modes, and the sha256 of every other file (all of them are listed)
    shared_a.safetensors           one A [r, in] per module whose target shares A across roles ("<module>.lora_A")
    roles/<role>.safetensors       that role's B [out, r] per module ("<module>.lora_B") and its own A [r, in] for
                                   targets that do not share A ("<module>.lora_A")
    peft/<role>/adapter_config.json, adapter_model.safetensors
                                   a standard PEFT LoRA adapter (scaling baked into B, lora_alpha == r)

Module names are the base model's ``nn.Linear`` paths (``model.layers.3.self_attn.v_proj``). Tensors are kept as
trained (unscaled); the LoRA delta of a role on a module is ``scaling * B @ A``. Bundles are written atomically
(temp directory, optional verification, then rename or atomic exchange) and loaded with full validation; every
problem is one :class:`BundleError` line. Only safetensors and JSON are ever read: nothing is unpickled.

``format`` holds the in-memory form, ``write`` the atomic writer, ``load`` the validating loader (``fields`` types the
manifest, ``peftcheck`` holds ``peft/`` to the bundle's tensors), ``basefp`` the base model's weights fingerprint and
``check_base``, ``fsutil`` the temp-dir / mode / rename helpers shared with training runs.
"""
from .format import (ALLOWED_SUFFIXES, CACHED_TARGETS, FORMAT_NAME, FORMAT_VERSION, MAX_ROLE_LEN, MODES,
                     PICKLE_SUFFIXES, RESERVED_ROLE_NAMES, ROLE_RE, Bundle, BundleError, base_fingerprint, layer_of,
                     lora_scaling, sha256_file, target_of, validate_role_name)
from .basefp import base_info, check_base, weights_fingerprint
from .load import load_bundle, read_manifest
from .write import manifest_of, write_bundle

__all__ = ["ALLOWED_SUFFIXES", "CACHED_TARGETS", "FORMAT_NAME", "FORMAT_VERSION", "MAX_ROLE_LEN", "MODES",
           "PICKLE_SUFFIXES", "RESERVED_ROLE_NAMES", "ROLE_RE", "Bundle", "BundleError", "base_fingerprint",
           "base_info", "check_base", "layer_of", "lora_scaling", "manifest_of", "load_bundle", "read_manifest",
           "sha256_file", "target_of", "validate_role_name", "weights_fingerprint", "write_bundle"]
