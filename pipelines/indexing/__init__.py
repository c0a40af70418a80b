"""The steps of the build-memory-index job, one module each; `memvq.pipelines.build` runs them in order.

- `plan`: the corpus recorded and cut into passage shards;
- `codec`: the codec the memory is compressed with (shipped, given, or fitted on a passage sample);
- `encode`: the encoders and the encoding of one shard (memory codes and dense embeddings);
- `actors`: the Ray encoder actors, sized per node, that encode the shards;
- `finalize`: the FAISS index from the shards' embeddings, the report and the manifest;
- `sync`: a store at a URI: its staging directory, pulled and published piece by piece.
"""
