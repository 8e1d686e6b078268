"""Publish a new version of a published package without TensorFlow or the training run: the same `model.onnx`
(byte-identical) and reference, with new metadata — today, the input gate derived from the package's own
reference (`python -m export --add-gate VERSION_DIR`)."""
from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Callable

from export.card import model_card
from export.triton import triton_config
from xray_core import gate, reference
from xray_core.files import atomic_write, publish_dir, temp_dir_beside
from xray_core.package import (
    CARD_FILE,
    METADATA_FILE,
    MODEL_FILE,
    Metadata,
    PackageError,
    load_metadata,
    versions,
    write_metadata,
)
from xray_core.verify import verify_package

CARRIED = (MODEL_FILE, reference.REFERENCE_FILE, reference.SPLITS_FILE)


class RepublishError(ValueError):
    """A package that cannot be republished (exit 2); the message is one line."""


def republish(source_dir: str, serving_dir: str, name: str, edit: Callable[[Metadata, str], Metadata],
              version: int | None = None, log=print) -> str:
    """Copy `source_dir`'s model and reference into serving_dir/name/<version>, with metadata `edit(meta,
    staging_dir)` returns; verified before it is published, atomically. -> the new version dir."""
    problems = [c for c in verify_package(source_dir) if not c.ok]
    if problems:
        raise RepublishError(f"{source_dir} does not verify ({problems[0].line()}); nothing published")
    meta = load_metadata(source_dir)
    name_dir = os.path.join(serving_dir, name)
    existing = versions(name_dir)
    version = version if version is not None else (existing[-1] + 1 if existing else 1)
    final = os.path.join(name_dir, str(version))
    if version < 1 or os.path.exists(final):
        raise RepublishError(f"{final} already exists; versions are never overwritten" if version >= 1
                             else "--version must be >= 1")
    try:
        os.makedirs(name_dir, exist_ok=True)
        staging = temp_dir_beside(final)
    except OSError as exc:
        raise RepublishError(f"cannot write to serving dir {serving_dir}: {exc.strerror}") from None
    try:
        for file in CARRIED:
            if os.path.isfile(os.path.join(source_dir, file)):
                shutil.copyfile(os.path.join(source_dir, file), os.path.join(staging, file))
        source = dict(meta.source or {}, republished_from=f"{meta.model_id} ({os.path.abspath(source_dir)})")
        new = edit(dataclasses.replace(meta, name=name, version=version, source=source), staging)
        write_metadata(os.path.join(staging, METADATA_FILE), new)
        with open(os.path.join(staging, CARD_FILE), "w") as f:
            f.write(model_card(new.to_dict()))
        failed = [c for c in verify_package(staging) if not c.ok]
        if failed:
            raise RepublishError(f"the new version does not verify ({failed[0].line()}); nothing published")
        try:
            publish_dir(staging, final)
        except OSError:
            raise RepublishError(f"{final} appeared meanwhile; versions are never overwritten") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    newest = load_metadata(os.path.join(name_dir, str(versions(name_dir)[-1])))
    text = triton_config(name, newest.image_size, heatmap=newest.heatmap_hw, embedding=newest.embedding_dim)
    atomic_write(os.path.join(name_dir, "config.pbtxt"), lambda f: f.write(text))
    log(f"published {final}")
    return final


def with_gate(meta: Metadata, staging: str, log=print) -> Metadata:
    """`meta` with the input gate derived from the package's reference rows."""
    if meta.embedding_dim is None or meta.reference is None:
        raise RepublishError(f"{meta.model_id} has no embedding output or no reference: no gate can be derived")
    try:
        rows = reference.load(os.path.join(staging, reference.REFERENCE_FILE)).embeddings
        spec = gate.derive(rows)
    except (PackageError, gate.GateError) as exc:
        raise RepublishError(str(exc)) from None
    log(f"input gate: {spec.line()}")
    return dataclasses.replace(meta, gate=spec.to_dict())


def add_gate(source_dir: str, serving_dir: str, name: str, version: int | None = None, command: str = "",
             log=print) -> str:
    def edit(meta: Metadata, staging: str) -> Metadata:
        source = dict(meta.source or {}, republish_command=command)
        return with_gate(dataclasses.replace(meta, source=source), staging, log)

    return republish(source_dir, serving_dir, name, edit, version, log)
