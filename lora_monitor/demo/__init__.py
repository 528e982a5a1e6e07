"""The offline demo: a tiny SD 1.x model, toy garment data, tiny scoring models and a kohya-style trainer."""
