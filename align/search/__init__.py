"""Search over a corpus of embeddings: one FAISS index sized from the corpus and a memory budget,
trained and measured (`index`); index_corpus's sharded build (`build`); searching every shard a
process holds as one, or through search actors (`corpus`); the index folder's files, manifest and
the check that it matches a model (`stored`). May import `storage`, `method`, `config`, `models`,
`runtime`, `data`.
"""
