"""Where a build writes: a store directory (local, or a filesystem every node mounts), written in place, or a
`pyarrow.fs` URI, when the build works in a staging directory, started afresh from what the URI holds, and
publishes each finished piece: the records, the passages then the plan, the codec, each shard (by the actor that
encoded it, its done marker last), the index, the manifest last of all. The URI is then the build's only state."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memvq.memory.artifact import MANIFEST_NAME, ManifestError, read_json
from memvq.memory.index import META_FILE
from memvq.memory.location import RemoteStore, clear, default_staging, is_uri
from memvq.memory.store import StoreLayout
from memvq.retrieval.lexical import HEADER as LEXICAL_HEADER


@dataclass
class BuildTarget:
    """The store a build writes: `layout` (the store itself, or the staging directory of one at `remote`)."""

    layout: StoreLayout
    remote: RemoteStore | None = None

    @classmethod
    def open(cls, out: str | Path, work_dir: str | Path | None = None) -> BuildTarget:
        """A local store directory, or a URI's staging directory under `work_dir` (default MEMVQ_STAGING_DIR, else
        ~/.cache/memvq/staging) pulled afresh from what the URI holds."""
        if not is_uri(out):
            return cls(StoreLayout(Path(out)))
        remote = RemoteStore(str(out))
        target = cls(StoreLayout(default_staging(remote.uri, None if work_dir is None else Path(work_dir))), remote)
        target._pull()
        return target

    def _relative(self, path: Path) -> str:
        return self.layout.relative(path)

    def _pull(self) -> None:
        """The staging directory afresh from the URI: its records, codec and manifest, and its passages while the
        codec is still to be fitted (a build with memory). A URI holding something else than a build is refused."""
        assert self.remote is not None
        layout = self.layout
        clear(layout.root)
        names = self.remote.files()
        if names and self._relative(layout.build_config) not in names:
            raise ManifestError(f"{self.remote.uri} exists and is not a memvq build directory; choose an empty --out")
        codec_dir = self._relative(layout.codec_dir)
        records = {self._relative(path) for path in (layout.build_config, layout.corpus_record, layout.plan)}
        for name in names:
            if name in records | {MANIFEST_NAME} or name.startswith(f"{codec_dir}/"):
                self.remote.download(name, layout.root / name)
        fitting = self._relative(layout.codec_file) not in names and MANIFEST_NAME not in names
        if fitting and names and read_json(layout.build_config, "build record").get("memory", True):
            for name in names:
                if name.endswith(".passages.parquet"):
                    self.remote.download(name, layout.root / name)

    def _publish(self, *paths: Path) -> None:
        """Upload files (in order) to the URI; nothing for a local store."""
        if self.remote is not None:
            for path in paths:
                self.remote.upload(path, self._relative(path))

    def _missing(self, path: Path) -> bool:
        return self.remote is not None and not self.remote.exists(self._relative(path))

    def publish_config(self) -> None:
        if self._missing(self.layout.build_config):
            self._publish(self.layout.build_config)

    def publish_corpus(self) -> None:
        if self._missing(self.layout.plan):
            self._publish(self.layout.corpus_record)

    def publish_plan(self, shards: int) -> None:
        """The passages, then the plan marker (which says they are there)."""
        if self._missing(self.layout.plan):
            passages = [self.layout.shard_file(shard, "passages.parquet") for shard in range(shards)]
            self._publish(*passages, self.layout.plan)

    def publish_codec(self) -> None:
        if self.remote is not None and self._missing(self.layout.codec_file):
            codec_dir = self._relative(self.layout.codec_dir)
            self.remote.upload_dir(self.layout.codec_dir, codec_dir, last=self.layout.codec_file.name)

    def publish_store(self) -> None:
        """The index and the lexical index, then the manifest (last of all: the store is complete); the staging
        directory emptied."""
        if self.remote is not None:
            self.remote.upload_dir(self.layout.index_dir, self._relative(self.layout.index_dir), last=META_FILE)
            if self.layout.lexical_dir.is_dir():
                lexical = self.layout.lexical_dir
                self.remote.upload_dir(lexical, self._relative(lexical), last=LEXICAL_HEADER)
            self._publish(self.layout.manifest)
            self.done()

    def done(self) -> None:
        """Empty the staging directory of a build to a URI."""
        if self.remote is not None:
            clear(self.layout.root)

    def markers(self, shards: int) -> list[dict[str, Any]]:
        """The shards' done markers, in shard order."""
        paths = [self.layout.shard_done(shard) for shard in range(shards)]
        if self.remote is None:
            return [read_json(path, "shard marker") for path in paths]
        return [self.remote.read_json(self._relative(path)) for path in paths]
