"""rstar-batch: distributed batch reranking with the R* cross-encoder on Ray Data."""

__version__ = "0.1.0"

from rstar_batch.config import ConfigError, RerankConfig  # noqa: E402
from rstar_batch.job import JobSummary  # noqa: E402
from rstar_batch.pipeline import rerank  # noqa: E402
from rstar_batch.score_corpus import score_corpus  # noqa: E402
from rstar_batch.tokenize_corpus import tokenize_corpus  # noqa: E402

__all__ = ["ConfigError", "JobSummary", "RerankConfig", "rerank", "score_corpus",
           "tokenize_corpus", "__version__"]
