"""The Beam pipeline: one linear chain, correct on DirectRunner and on DaskRunner.

``ListShards`` (Create over shard descriptors: a few integers each) -> ``ReadShard`` (the shard's paths
from the listing file) -> ``DecodeScoreWrite`` (decode and score in batches, write the shard's CSV).
Everything is emitted from ``process``, never ``finish_bundle`` (whose output DaskRunner drops), and the
chain has a single leaf (DaskRunner computes only the last one). README, "Why the pipeline looks like this".
"""
from __future__ import annotations

import os

import apache_beam as beam

from batch_job import drift_check, heatmaps
from batch_job import shards as shard_files
from batch_job.scoring import ScoringSpec, score_paths


class ReadShard(beam.DoFn):
    """(shard id, offset, count) -> (shard id, [paths as bytes], [labels]) from the listing file.

    Paths travel as bytes (os.fsencode): Beam's string coder rejects file names that are
    not valid UTF-8, which real file systems do contain.
    """

    def __init__(self, listing_path: str):
        self.listing_path = listing_path

    def process(self, shard):
        shard_id, offset, count = shard
        listed = list(shard_files.read_listing(self.listing_path, offset, count))
        yield shard_id, [os.fsencode(p) for _, p, _ in listed], [label for _, _, label in listed]


class ScoreAndWriteShard(beam.DoFn):
    """(shard id, [paths], [labels]) -> (shard id, rows written).

    Decodes and scores in batches (one onnxruntime session per worker process, shared by its threads)
    and writes the shard's CSV atomically inside process(). A retried task simply rewrites the same file.
    With spec.heatmaps = N, the shard's top N flagged images go to a sidecar first (heatmaps.py); with
    spec.drift_sample = K, its K first images in the seeded sample order with their embeddings (drift_check.py).
    """

    def __init__(self, spec: ScoringSpec, out_dir: str):
        self.spec, self.out_dir = spec, out_dir

    def process(self, element):
        shard_id, paths, labels = element
        records = score_paths([os.fsdecode(p) for p in paths], self.spec, labels)
        if self.spec.heatmaps:
            heatmaps.write_sidecar(self.out_dir, shard_id, heatmaps.top_flagged(records, self.spec.heatmaps))
        if self.spec.drift_sample:
            drift_check.write_sidecar(self.out_dir, shard_id, *drift_check.smallest(records, self.spec.drift_sample))
        shard_files.write_shard(self.out_dir, shard_id, records, self.spec.ledger_path is not None)
        yield shard_id, len(records)


def build_pipeline(p: beam.Pipeline, shards, listing_path: str, spec: ScoringSpec, out_dir: str):
    return (
        p
        | "ListShards" >> beam.Create(shards, reshuffle=True)
        | "ReadShard" >> beam.ParDo(ReadShard(listing_path))
        | "DecodeScoreWrite" >> beam.ParDo(ScoreAndWriteShard(spec, out_dir))
    )
