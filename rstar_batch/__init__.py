"""rstar-batch: distributed batch reranking with the R* cross-encoder on Ray Data."""

from rstar_batch.config import Columns, ConfigError, RerankConfig
from rstar_batch.dataset import score_dataset
from rstar_batch.manifest import package_version
from rstar_batch.pipeline import rerank
from rstar_batch.score_corpus import score_corpus
from rstar_batch.summary import JobSummary
from rstar_batch.tokenize_corpus import tokenize_corpus

__version__ = package_version()

__all__ = ["Columns", "ConfigError", "JobSummary", "RerankConfig", "rerank", "score_corpus",
           "score_dataset", "tokenize_corpus", "__version__"]
