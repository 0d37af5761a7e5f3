"""kNN-LM machinery: exact kNN search (search), datastores (datastore), kNN-LM distributions and interpolation
(knn_lm), and the MLP Memory / Memory Decoder pipeline stages (pipeline)."""
