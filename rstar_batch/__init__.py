"""rstar-batch: distributed batch reranking with the R* cross-encoder on Ray Data."""

from rstar_batch.config import ConfigError, RerankConfig
from rstar_batch.manifest import package_version
from rstar_batch.pipeline import rerank
from rstar_batch.score_corpus import score_corpus
from rstar_batch.summary import JobSummary
from rstar_batch.tokenize_corpus import tokenize_corpus

__version__ = package_version()

__all__ = ["ConfigError", "JobSummary", "RerankConfig", "rerank", "score_corpus",
           "tokenize_corpus", "__version__"]
