"""Names of the internal columns that flow between stages.

Internal names start with an underscore so they can never collide with a
column the user keeps (kept columns pass through under their input names).
"""

CHUNK = "_chunk"          # which checkpoint chunk the row belongs to
ROW = "_row"              # the row's position within its chunk
QUERY_ID = "_qid"
QUERY = "_query"
DOC_ID = "_did"
PASSAGE = "_passage"
REJECT = "_reject"        # null for rows that are scored, else the reason
BUCKET = "_bucket"        # which output file the row's query lands in
INPUT_IDS = "_input_ids"
TOKEN_TYPE_IDS = "_token_type_ids"
PASSAGE_IDS = "_passage_ids"      # score-corpus: a passage's own token ids
EMPTY_PASSAGE = "_empty_passage"  # score-corpus: the passage is the empty string
WINDOWS = "_windows"      # maxp: token count of each window encoding in _input_ids
NODE = "_node"            # the Ray node whose replica scored the row (dictionary-encoded)
SCORE = "score"

# A tokenized corpus's own columns (tokenize-corpus's output; io/tokenized.py).
TOKENIZED_DOC_ID = "doc_id"
TOKENIZED_PASSAGE_IDS = "passage_ids"
TOKENIZED_EMPTY_PASSAGE = "empty_passage"

# Reasons a row is not scored; each is counted in the summary.
NULL_QUERY_ID = "null_query_id"
NULL_DOC_ID = "null_doc_id"
NULL_QUERY = "null_query"
NULL_PASSAGE = "null_passage"
DUPLICATE_PAIR = "duplicate_pair"          # a repeat of a (query_id, doc_id) pair: written once
DUPLICATE_QUERY_ID = "duplicate_query_id"  # score-corpus: a repeat of a query id
PREPARE_REASON = "_prepare_reason"  # set when the corpus or queries lack a row's text

# The score cache (rstar_batch/cache/): a pair's key, and whether its score was reused.
PAIR_KEY = "_pair_key"
REUSED = "_reused"
# A row's place in its input chunk once the lookup split the chunk into hits and
# misses (cache/lookup.py): the rank pass orders rows by (input chunk, this).
INPUT_ROW = "_input_row"
