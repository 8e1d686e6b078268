"""The Beam pipeline: one linear chain, correct on DirectRunner and on DaskRunner.

``ListShards`` (Create over shard descriptors: a few integers each) -> ``ReadShard`` (the shard's paths
from the listing file) -> ``DecodeScoreWrite`` (decode and score in batches, write the shard's summary and CSV).
Everything is emitted from ``process``, never ``finish_bundle`` (whose output DaskRunner drops), and the
chain has a single leaf (DaskRunner computes only the last one). README, "Why the pipeline looks like this".
"""
from __future__ import annotations

import os

import apache_beam as beam
from threadpoolctl import threadpool_limits

from batch_job import shard_result, worklist
from batch_job import shards as shard_files
from batch_job.scoring import ScoringSpec
from batch_job.unchanged import score_shard


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

    Decodes and scores in batches (one onnxruntime session per worker process, shared by its threads; with a
    ledger, files unchanged since an earlier night are not read: unchanged.py) and writes,
    inside process(), the shard's summary into the scratch folder and then its CSV, each atomically
    (shard_result.py). A retried task simply rewrites the same files.
    """

    def __init__(self, spec: ScoringSpec, out_dir: str, scratch: str):
        self.spec, self.out_dir, self.scratch = spec, out_dir, scratch

    def setup(self):
        # One BLAS thread in every worker process (the gate's one matrix product per batch is BLAS): the workers
        # already keep each core busy, and OpenBLAS's own threads busy-wait after each call, taking a core from
        # them (the scoring phase on 2 cores was 12-25% slower: bench/RESULTS.md 0k). In the job's own process
        # (DirectRunner threads) the limit stays for the report too, whose BLAS work (the drift step's PCA) is small.
        threadpool_limits(limits=1, user_api="blas")

    def process(self, element):
        shard_id, paths, labels = element
        rows, file_keys = score_shard([os.fsdecode(p) for p in paths], labels, self.spec)
        shard_result.write(self.scratch, shard_id, shard_result.summarise(rows, self.spec, file_keys))
        worklist.write_part(self.scratch, shard_id, rows)
        shard_files.write_shard(self.out_dir, shard_id, rows)
        yield shard_id, len(rows)


def build_pipeline(p: beam.Pipeline, shards, listing_path: str, spec: ScoringSpec, out_dir: str, scratch: str):
    return (
        p
        | "ListShards" >> beam.Create(shards, reshuffle=True)
        | "ReadShard" >> beam.ParDo(ReadShard(listing_path))
        | "DecodeScoreWrite" >> beam.ParDo(ScoreAndWriteShard(spec, out_dir, scratch))
    )
