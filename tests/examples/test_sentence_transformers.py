"""MiniLM the way embedding users call it: sentence-transformers' `SentenceTransformer(folder)
.encode(...)`, with its transformer module compiled by q4. (sentence-transformers is a test extra.)"""

from __future__ import annotations

import pytest
import torch
from sentence_transformers import SentenceTransformer

from qcompile.backends import q4 as q4_backend
from qcompile.tools import zoo
from qcompile.tools.accuracy import sentences
from tests.helpers.recipes import quick

# qcompile eval's bound for w4a4 on MiniLM is 0.96 with 512 calibration sentences; here 128
MIN_COSINE = 0.94


@pytest.mark.model
def test_sentence_transformer_encodes_close_to_fp32_with_its_transformer_compiled_by_q4():
    model = SentenceTransformer(str(zoo.minilm_folder()), device="cpu")
    texts = sentences("pride_and_prejudice", 64)
    expected = model.encode(texts, convert_to_tensor=True, batch_size=32)
    calibration = [dict(model.tokenizer(sentences("emma", 32, skip=32 * i), padding=True, truncation=True,
                                        return_tensors="pt")) for i in range(4)]
    bert = model[0].model
    before = {k: v.clone() for k, v in bert.state_dict().items()}
    model[0].model = torch.compile(bert, backend="q4", options={
        "pipeline": quick("w4a4"), "calibration": calibration, "progress": False})
    got = model.encode(texts, convert_to_tensor=True, batch_size=32)
    assert got.shape == expected.shape == (64, 384)
    cosine = torch.nn.functional.cosine_similarity(got, expected).mean().item()
    assert cosine >= MIN_COSINE, cosine
    # it ran quantized: the graph compiled for its batches holds the encoder's 36 linears fused
    # (and the pooler's, which BertModel computes and sentence-transformers does not read)
    graphs = q4_backend.compiled_graphs()
    assert graphs and graphs[-1].count_ops(torch.ops.q4.linear_w4a4.default) >= 36
    assert all(torch.equal(v, before[k]) for k, v in bert.state_dict().items())  # the model is only read
