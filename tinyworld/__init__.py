"""The embedded default: a miniature world of problems, a tokenizer, four teachers and a student.

Everything is built by our own code on a CPU in minutes (``ampo-cache tiny-world build DIR``), so
the real pipeline (build, store, SQL, train, eval) runs end to end with no model hub and no GPU.
"""
