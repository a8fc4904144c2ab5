"""Where each job writes by default, and so where the next job reads: the one place these paths
are spelled. The config's defaults, the demo and make_world build theirs from here, so a path
one job writes and another reads cannot drift apart. `{output_dir}` expands when a job starts
(`Config.expand`)."""

# Inside make_world's output (world.output): file and folder names.
IMAGES = "images"
HELDOUT_IMAGES = "heldout_images"
PRETRAIN_IMAGES = "pretrain_images"
FINETUNE_CAPTIONS = "finetune_captions"
EVAL_IMAGES = "eval_images"
GROUND_TRUTH = "ground_truth.parquet"
EVAL_GROUND_TRUTH = "eval_ground_truth.parquet"
QUERIES = "queries.parquet"
HPIR = "hpir.parquet"
RATINGS = "ratings.parquet"
# What a training job (pretrain, finetune, train_scorer) exports in its output folder.
MODEL_FILE = "model.pt"

WORLD = "{output_dir}/world"
WORLD_IMAGES = f"{WORLD}/{IMAGES}"
WORLD_HELDOUT_IMAGES = f"{WORLD}/{HELDOUT_IMAGES}"
WORLD_GROUND_TRUTH = f"{WORLD}/{GROUND_TRUTH}"
WORLD_EVAL_IMAGES = f"{WORLD}/{EVAL_IMAGES}"
WORLD_EVAL_GROUND_TRUTH = f"{WORLD}/{EVAL_GROUND_TRUTH}"
WORLD_QUERIES = f"{WORLD}/{QUERIES}"
WORLD_HPIR = f"{WORLD}/{HPIR}"
WORLD_RATINGS = f"{WORLD}/{RATINGS}"

AESTHETIC_SCORER = "{output_dir}/aesthetic_scorer"
PRETRAIN = "{output_dir}/pretrain"
INDEX_CORPUS = "{output_dir}/index_corpus"
INDEX_CORPUS_ALIGNED = "{output_dir}/index_corpus_aligned"  # the demo's aligned-model index
INDEX_CORPUS_EVAL = "{output_dir}/index_corpus_eval"  # the evaluation gallery's scores
BUILD_PREFERENCES = "{output_dir}/build_preferences"
PAIRS = f"{BUILD_PREFERENCES}/pairs"
FINETUNE = "{output_dir}/finetune"
EVALUATE = "{output_dir}/evaluate"
ALIGNED_MODEL = f"{FINETUNE}/{MODEL_FILE}"
