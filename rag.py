"""
Retrieval-augmented generation, by hand: chunk your documents, index them (BM25 and/or dense vectors from one
of our models), retrieve passages for a question, and let a model answer from them with numbered citations.

    python rag.py index --docs=../shared/data/docs --index=rag-index
    python rag.py query --index=rag-index "What does PEP 8 say about line length?"
    python rag.py ask --index=rag-index --init_from=out-lora-gpt2-instruct "What does PEP 8 say about tabs?"
    python rag.py eval --index=rag-index --qa=questions.jsonl --report=rag.json
    python rag.py tune --index=rag-index --embed_from=out-shakespeare-char --out_dir=out-embed   # dense, by self-supervision

BM25 (Okapi) is written out over numpy arrays. Dense retrieval embeds each chunk with a checkpoint of ours
(--embed_from: mean of the last hidden states, normalised; cosine similarity). Hybrid retrieval fuses both
rankings by reciprocal rank fusion. Running `index` again on an existing index reads only new or changed
files and drops the chunks of deleted ones; `query` and `ask` warn when sources changed since.
"""
import hashlib
import html
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from configurator import (UserError, atomic_write, decode_file, jsonl_lines, list_files, parse_config, run_cli,
                          writable_dir, writable_file)
from train import (chat_style, load_checkpoint, load_model, read_json_records, resolve_device,
                   save_checkpoint, stream_text)

EXTENSIONS = ('.txt', '.md', '.rst', '.html', '.htm', '.jsonl')
JSONL_FIELDS = ('text', 'content', 'contents', 'abstract', 'body')


@dataclass
class RagConfig:
    docs: str = ''                  # index: a folder (searched recursively), a glob, or a file
    index: str = 'rag-index'        # the index folder
    embed_from: str = ''            # index: a checkpoint for dense vectors (out_dir, gpt2, hf:...); '' = BM25 only
    chunk_tokens: int = 200         # words and punctuation marks per chunk
    chunk_overlap: int = 40         # tokens each chunk shares with the previous one
    k1: float = 1.5                 # BM25 term-frequency saturation
    b: float = 0.75                 # BM25 length normalisation
    idf: str = 'lucene'             # lucene: log(1 + (N - n + .5) / (n + .5)); okapi: rank_bm25's BM25Okapi
    retriever: str = 'auto'         # bm25 | dense | hybrid | auto (hybrid when the index has vectors)
    top_k: int = 5                  # passages shown (query) or given to the model (ask)
    rrf_k: int = 60                 # reciprocal rank fusion: score = sum of weight / (rrf_k + rank)
    dense_weight: float = 1.0       # hybrid: the dense ranking's weight in the fusion (BM25's is 1)
    qa: str = ''                    # eval: JSONL of {question, answers?, source?}
    report: str = ''                # eval: write the figures here as JSON
    init_from: str = ''             # ask: the model that answers
    max_new_tokens: int = 200
    temperature: float = 0.0        # ask: 0 = greedy, the usual choice for answers grounded in passages
    top_p: float = 1.0
    seed: int = 1337
    batch_size: int = 16            # chunks embedded together
    pooling: str = 'auto'           # dense vectors: mean of the last hidden states (hidden) or of the token
                                    # embeddings (embeddings); auto = embeddings for a `rag.py tune` checkpoint
    out_dir: str = ''               # tune: where the tuned embedding model goes
    tune_steps: int = 400           # tune: contrastive steps (batches of tune_batch chunks)
    tune_batch: int = 32
    tune_lr: float = 3e-3
    device: str = 'cpu'
    trust_checkpoint: bool = False  # load checkpoints that need pickle (it can run code): trusted files only


# ----------------------------------------------------------------------------------------------------------
# documents and chunks

TAG = re.compile(r'<(?:(!--)|(script|style)\b|[a-zA-Z/!?])', re.I)
CLOSE = {'script': re.compile(r'</script\s*>', re.I), 'style': re.compile(r'</style\s*>', re.I)}


def strip_html(text):
    """The visible text of a page: tags become spaces, entities are decoded, scripts, styles and comments go.
    One pass, each search starting where the last ended, so hostile pages (thousands of unclosed comments or
    <script> tags) take linear time; regular expressions over the whole page and Python 3.11's html.parser
    were quadratic there. Like a browser, an unclosed comment or script hides the rest."""
    out, i = [], 0
    while (m := TAG.search(text, i)) is not None:
        out.append(text[i:m.start()])
        if m.group(1):  # <!-- ... -->
            end = text.find('-->', m.end())
            i = len(text) if end < 0 else end + 3
        elif m.group(2):  # <script ...> ... </script>
            close = CLOSE[m.group(2).lower()].search(text, m.end())
            i = len(text) if close is None else close.end()
        else:
            end = text.find('>', m.end())
            if end < 0:  # a '<' that opens nothing: the rest is text
                break
            i = end + 1
        out.append(' ')
    out.append(text[i:])
    return html.unescape(''.join(out))


def read_documents(path, name):
    """[(source, text)] of one file: a JSONL file gives one document per line (source name:LINE), the others
    one; (None, why) when the file is binary or unreadable."""
    try:
        text, why = decode_file(path)
    except OSError as e:
        return None, str(e)
    if text is None:
        return None, why
    if path.lower().endswith(('.html', '.htm')):
        return [(name, strip_html(text))], None
    if not path.lower().endswith('.jsonl'):
        return [(name, text)], None
    out = []
    try:
        for n, rec in jsonl_lines(text, 'line'):
            field = next((f for f in JSONL_FIELDS if isinstance(rec, dict) and isinstance(rec.get(f), str)), None)
            if field is None:
                return None, f"line {n} has none of the text fields {', '.join(JSONL_FIELDS)}"
            out.append((f"{name}:{n}", rec[field]))
    except UserError as e:  # a file that cannot be read is skipped and counted, not an error for the whole index
        return None, str(e)
    return out, None


TOKEN = re.compile(r'\w+|[^\w\s]')


def chunk_spans(text, size, overlap):
    """(start, end) character spans of chunks of `size` tokens (words and punctuation marks) that overlap by
    `overlap` tokens, so a sentence cut at one chunk's end is whole in the next."""
    spans = [m.span() for m in TOKEN.finditer(text)]
    out, step = [], max(1, size - overlap)
    for i in range(0, max(1, len(spans) - overlap), step):
        piece = spans[i:i + size]
        if piece:
            out.append((piece[0][0], piece[-1][1]))
    return out


def terms(text):
    """BM25's terms: lower-cased words (no stemming, no stop words)."""
    return re.findall(r'\w+', text.lower())


def file_state(path):
    with open(path, 'rb') as f:
        return {'sha256': hashlib.sha256(f.read()).hexdigest(), 'size': os.path.getsize(path),
                'mtime': os.path.getmtime(path)}


# ----------------------------------------------------------------------------------------------------------
# the index: chunks, their BM25 term counts, optional dense vectors

class Index:
    """Chunks (source, start, end, text), per chunk its BM25 term ids and counts, and optionally a dense vector
    per chunk. Term-major postings for fast queries are derived from the per-chunk counts in one numpy pass
    (postings()), so chunks can be added and removed without re-reading or re-embedding the others."""

    def __init__(self, cfg):
        self.settings = {k: getattr(cfg, k) for k in ('chunk_tokens', 'chunk_overlap', 'k1', 'b', 'idf', 'embed_from',
                                                      'pooling')}
        self.root, self.files, self.chunks = None, {}, []
        self.vocab, self.chunk_terms, self.chunk_tfs, self.dense = {}, [], [], None
        self._postings, self._embedder = None, None
        self.trust = False  # load an embed_from checkpoint that needs pickle (train.load_checkpoint)

    # -- building ------------------------------------------------------------------------------------------
    def add(self, source, text, vectors=None):
        """Chunk one document and add its chunks (vectors: their dense vectors, if the index has them)."""
        for start, end in chunk_spans(text, self.settings['chunk_tokens'], self.settings['chunk_overlap']):
            words = terms(text[start:end])
            ids = np.array([self.vocab.setdefault(w, len(self.vocab)) for w in words], dtype=np.int64)
            uniq, tf = np.unique(ids, return_counts=True)
            self.chunks.append({'source': source, 'start': start, 'end': end, 'text': text[start:end],
                                'length': len(words)})
            self.chunk_terms.append(uniq.astype(np.int32))
            self.chunk_tfs.append(tf.astype(np.int32))
        self._postings = None

    def remove(self, sources):
        """Drop the chunks of these sources (a file's name, or the name:LINE documents of a JSONL file)."""
        keep = [i for i, c in enumerate(self.chunks) if c['source'].rsplit(':', 1)[0] not in sources
                and c['source'] not in sources]
        self.chunks = [self.chunks[i] for i in keep]
        self.chunk_terms = [self.chunk_terms[i] for i in keep]
        self.chunk_tfs = [self.chunk_tfs[i] for i in keep]
        if self.dense is not None:
            self.dense = self.dense[keep]
        self._postings = None

    def postings(self):
        """Term-major arrays: for term t, chunks docs[ptr[t]:ptr[t+1]] with BM25 weights w[...] (each term's
        contribution to a chunk's score, precomputed: a query only sums them)."""
        if self._postings is None:
            N, V = len(self.chunks), len(self.vocab)
            lengths = np.array([c['length'] for c in self.chunks], dtype=np.float64)
            t = np.concatenate(self.chunk_terms) if N else np.zeros(0, np.int32)
            tf = np.concatenate(self.chunk_tfs).astype(np.float64) if N else np.zeros(0)
            d = np.repeat(np.arange(N), [len(x) for x in self.chunk_terms])
            order = np.argsort(t, kind='stable')
            t, tf, d = t[order], tf[order], d[order]
            ptr = np.searchsorted(t, np.arange(V + 1))
            df = np.diff(ptr).astype(np.float64)
            idf = self.idf(df, N)
            k1, b = self.settings['k1'], self.settings['b']
            avgdl = lengths.mean() if N else 1.0
            w = idf[t] * tf * (k1 + 1) / (tf + k1 * (1 - b + b * lengths[d] / avgdl))
            self._postings = (ptr, d, w)
        return self._postings

    def idf(self, df, N):
        if self.settings['idf'] == 'okapi':  # rank_bm25's BM25Okapi: terms in over half the chunks would score
            idf = np.log(N - df + 0.5) - np.log(df + 0.5)  # negative; they get 0.25 x the mean idf instead
            present = df > 0
            return np.where(idf < 0, 0.25 * idf[present].mean(), idf) if present.any() else idf
        return np.log(1 + (N - df + 0.5) / (df + 0.5))

    # -- searching -----------------------------------------------------------------------------------------
    def bm25_top(self, query, k):
        # chunks that share no term with the query are not results, however few the others are
        return [(i, s) for i, s in top(self.bm25_scores(query), k) if s > 0]

    def bm25_scores(self, query):
        """BM25 score of every chunk for one query (N,). A term repeated in the query counts each time."""
        ptr, d, w = self.postings()
        scores = np.zeros(len(self.chunks))
        for term in terms(query):
            t = self.vocab.get(term)
            if t is not None:
                s, e = ptr[t], ptr[t + 1]
                scores[d[s:e]] += w[s:e]  # a term's chunks are distinct, so fancy-index += adds each once
        return scores

    def search(self, queries, k, retriever='auto', rrf_k=60, dense_weight=1.0):
        """For each query, [(chunk index, score)] best first: BM25 scores, cosine similarities, or fused
        reciprocal-rank scores."""
        retriever = ('hybrid' if self.dense is not None else 'bm25') if retriever == 'auto' else retriever
        if retriever in ('dense', 'hybrid') and self.dense is None:
            raise UserError("this index has no dense vectors: build it with --embed_from=CHECKPOINT, or use "
                            "--retriever=bm25")
        if retriever not in ('bm25', 'dense', 'hybrid'):
            raise UserError(f"retriever must be bm25, dense, hybrid or auto, not '{retriever}'")
        k = min(k, len(self.chunks))
        dense = self.embed(queries) @ self.dense.T if retriever != 'bm25' else None  # (Q, N) cosines
        out = []
        for i, q in enumerate(queries):
            if retriever == 'bm25':
                out.append(self.bm25_top(q, k))
            elif retriever == 'dense':
                out.append(top(dense[i], k))
            else:  # each ranking's top candidates; a chunk scores 1 / (rrf_k + its rank) in each list it is in
                fused = {}
                depth = max(k, 100)
                for ranking, weight in ((self.bm25_top(q, depth), 1.0), (top(dense[i], depth), dense_weight)):
                    for rank, (c, _) in enumerate(ranking, 1):
                        fused[c] = fused.get(c, 0.0) + weight / (rrf_k + rank)
                out.append(sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))[:k])
        return out

    # -- dense vectors -------------------------------------------------------------------------------------
    def embedder(self, device='cpu'):
        if self._embedder is None:
            model, tok = load_model(self.settings['embed_from'], device, trust=self.trust)
            if self.settings['pooling'] == 'auto':
                self.settings['pooling'] = tuned_pooling(self.settings['embed_from'], self.trust) or 'hidden'
            self._embedder = (model, tok.tolerant())
        return self._embedder

    @torch.no_grad()
    def embed(self, texts, batch_size=16):
        """Normalised vectors (n, C) of texts from the embedding model (see embed_texts)."""
        model, tok = self.embedder()
        out = [embed_texts(model, tok, texts[i:i + batch_size], self.settings['pooling']).numpy()
               for i in range(0, len(texts), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, 1), np.float32)

    # -- files ---------------------------------------------------------------------------------------------
    def update(self, docs, batch_size=16, log=print):
        """Bring the index up to date with docs: new and changed files are (re)read, chunked and embedded, the
        chunks of deleted files dropped, unchanged files left alone. Returns the counts."""
        paths = list_files(docs, EXTENSIONS)
        if paths is None or not paths and not os.path.isdir(docs):
            raise UserError(f"--docs '{docs}' is not a folder, a file, or a glob that matches anything")
        root = docs if os.path.isdir(docs) else os.path.dirname(docs) if os.path.isfile(docs) else \
            os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else '.'
        self.root = os.path.abspath(root)
        names = {os.path.relpath(p, root): p for p in paths}
        counts = dict(new=0, changed=0, deleted=0, unchanged=0, skipped=0)
        gone = [n for n in self.files if n not in names]
        counts['deleted'] = len(gone)
        self.remove(set(gone))
        for n in gone:
            del self.files[n]
        for name, path in names.items():
            state = file_state(path)
            old = self.files.get(name)
            if old and old['sha256'] == state['sha256']:
                counts['unchanged'] += 1
                continue
            docs_, why = read_documents(path, name)
            if docs_ is None:
                counts['skipped'] += 1
                log(f"skipped {path}: {why}")
                if old:  # it was readable before: its old chunks go
                    self.remove({name})
                    del self.files[name]
                continue
            if old:
                self.remove({name})
            counts['changed' if old else 'new'] += 1
            before = len(self.chunks)
            for source, text in docs_:
                self.add(source, text)
            if self.settings['embed_from']:
                vecs = self.embed([c['text'] for c in self.chunks[before:]], batch_size)
                self.dense = vecs if self.dense is None or not len(self.dense) else np.concatenate([self.dense, vecs])
            self.files[name] = state
        return counts

    def stale(self):
        """Names of indexed files that changed or disappeared since they were indexed."""
        out = []
        for name, state in self.files.items():
            path = os.path.join(self.root, name)
            if not os.path.isfile(path):
                out.append(name + ' (deleted)')
            elif os.path.getsize(path) != state['size'] or os.path.getmtime(path) != state['mtime']:
                if file_state(path)['sha256'] != state['sha256']:
                    out.append(name + ' (changed)')
        return out

    # -- saving --------------------------------------------------------------------------------------------
    def save(self, folder):
        """Write the index to folder: index.json (settings, files, vocabulary), chunks.jsonl, terms.npz and
        dense.npy. Each file is written under a temporary name and renamed."""
        os.makedirs(folder, exist_ok=True)
        lens = np.array([len(x) for x in self.chunk_terms], dtype=np.int64)

        def put(name, mode, write):
            with atomic_write(os.path.join(folder, name), mode) as f:
                write(f)
        put('terms.npz', 'wb', lambda f: np.savez(f, lengths=lens,
                                                  terms=np.concatenate(self.chunk_terms) if self.chunks else lens,
                                                  tfs=np.concatenate(self.chunk_tfs) if self.chunks else lens))
        if self.dense is not None:
            put('dense.npy', 'wb', lambda f: np.save(f, self.dense))
        put('chunks.jsonl', 'w', lambda f: f.write(''.join(json.dumps(c) + '\n' for c in self.chunks)))
        put('index.json', 'w', lambda f: json.dump({'settings': self.settings, 'root': self.root, 'files': self.files,
                                                    'vocab': list(self.vocab)}, f))

    @classmethod
    def load(cls, folder):
        path = os.path.join(folder, 'index.json')
        if not os.path.isfile(path):
            raise UserError(f"no index at '{folder}': build one with `python rag.py index --docs=PATH --index={folder}`")
        try:
            meta = json.load(open(path))
            idx = cls(RagConfig(**meta['settings']))
            idx.root, idx.files = meta['root'], meta['files']
            idx.vocab = {w: i for i, w in enumerate(meta['vocab'])}
            idx.chunks = [json.loads(line) for line in open(os.path.join(folder, 'chunks.jsonl'))]
            arrays = np.load(os.path.join(folder, 'terms.npz'))
            cut = np.cumsum(arrays['lengths'])[:-1]
            idx.chunk_terms = list(np.split(arrays['terms'], cut)) if idx.chunks else []
            idx.chunk_tfs = list(np.split(arrays['tfs'], cut)) if idx.chunks else []
            if os.path.isfile(os.path.join(folder, 'dense.npy')):
                idx.dense = np.load(os.path.join(folder, 'dense.npy'))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"the index at '{folder}' is damaged ({type(e).__name__}: {e}): build it again "
                            f"with `python rag.py index`") from None
        if len(idx.chunk_terms) != len(idx.chunks) or (idx.dense is not None and len(idx.dense) != len(idx.chunks)):
            raise UserError(f"the index at '{folder}' is inconsistent: build it again with `python rag.py index`")
        return idx


def embed_texts(model, tok, texts, pooling='hidden', max_len=None):
    """(n, C) unit vectors: the mean over each text's tokens of the model's last hidden states ('hidden') or of
    its token embeddings ('embeddings'), texts cut to max_len tokens (default: the context). Differentiable."""
    ids = [tok.encode(t)[:max_len or model.config.block_size] or [0] for t in texts]
    T = max(len(x) for x in ids)
    dev = next(model.parameters()).device
    x = torch.zeros(len(ids), T, dtype=torch.long, device=dev)
    mask = torch.zeros(len(ids), T, dtype=torch.bool, device=dev)
    for j, row in enumerate(ids):  # right padding: causal models never let real tokens see it
        x[j, :len(row)], mask[j, :len(row)] = torch.tensor(row), True
    bert = model.config.model_type == 'bert'
    if pooling == 'embeddings':
        h = (model.embeddings.wte if bert else model.transformer.wte)(x)
    elif pooling == 'hidden':
        h = model.encode(x, attention_mask=mask) if bert else model.transformer.ln_f(model.hidden(x))
    else:
        raise UserError(f"pooling must be hidden or embeddings, not '{pooling}'")
    m = mask[..., None].to(h.dtype)
    return torch.nn.functional.normalize(((h * m).sum(1) / m.sum(1)).float(), dim=-1).cpu()  # (B, C)


def tuned_pooling(embed_from, trust=False):
    # the pooling a `rag.py tune` checkpoint was trained for (None for any other model)
    path = os.path.join(embed_from, 'ckpt.pt')
    if not os.path.isfile(path):
        return None
    ckpt = load_checkpoint(path, trust=trust, mmap=True)
    return ckpt.get('rag_pooling') if isinstance(ckpt, dict) else None


def cloze(text, rng):
    """(query, context) for the inverse cloze task: one sentence of the chunk, and the chunk without it (one
    time in ten with it, so that overlap still counts). Text without sentences gives a 16-word window."""
    sents = [s for s in re.split(r'(?<=[.!?])\s+', text) if len(s) > 20]
    if len(sents) < 2:
        words = text.split()
        k = rng.randrange(max(1, len(words) - 16))
        return ' '.join(words[k:k + 16]), ' '.join(words[:k] + words[k + 16:]) or text
    k = rng.randrange(len(sents))
    return sents[k], text if rng.random() < 0.1 else ' '.join(sents[:k] + sents[k + 1:])


def tune(idx, cfg, log=print):
    """Teach an embedding model this index's text, without labels: the inverse cloze task (Lee et al. 2019).
    A sentence of a chunk must pick the rest of its chunk out of the batch's other chunks (cross-entropy over
    cosine similarities / 0.05). Only the token embedding table trains, and texts are embedded as the mean of
    their token embeddings: a few hundred steps take under a minute on a CPU. Writes out_dir/ckpt.pt."""
    import random
    model, tok = load_model(cfg.embed_from, resolve_device(cfg.device), trust=cfg.trust_checkpoint)
    tok = tok.tolerant()
    texts = [c['text'] for c in idx.chunks]
    if len(texts) < 2:
        raise UserError("tune needs an index of at least 2 chunks")
    table = (model.embeddings.wte if model.config.model_type == 'bert' else model.transformer.wte).weight
    model.requires_grad_(False)
    table.requires_grad_(True)
    opt = torch.optim.AdamW([table], lr=cfg.tune_lr, weight_decay=0.0)
    rng, B = random.Random(cfg.seed), min(cfg.tune_batch, len(texts))
    for step in range(1, cfg.tune_steps + 1):
        pairs = [cloze(texts[i], rng) for i in rng.sample(range(len(texts)), B)]
        q = embed_texts(model, tok, [p[0] for p in pairs], 'embeddings', max_len=64)
        c = embed_texts(model, tok, [p[1] for p in pairs], 'embeddings')
        loss = torch.nn.functional.cross_entropy(q @ c.T / 0.05, torch.arange(B))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == cfg.tune_steps:
            log(f"tune step {step}/{cfg.tune_steps}: loss {loss.item():.4f} (chance {np.log(B):.2f})")
    os.makedirs(cfg.out_dir, exist_ok=True)
    save_checkpoint({'model': model.state_dict(), 'model_args': asdict(model.config), 'meta': {'tokenizer': tok.meta},
                     'rag_pooling': 'embeddings', 'config': asdict(cfg)}, os.path.join(cfg.out_dir, 'ckpt.pt'))
    return model


def top(scores, k):
    """[(index, score)] of the k highest scores, best first (ties: lower index first)."""
    k = min(k, len(scores))
    if k == 0:
        return []
    cand = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    cand = cand[np.lexsort((cand, -scores[cand]))]
    return [(int(i), float(scores[i])) for i in cand]


# ----------------------------------------------------------------------------------------------------------
# answering: passages that fit the context, numbered for citation

def build_prompt(question, passages, tok, budget, style=None):
    """(prompt text, notes): the question after the passages, numbered [1].. with their sources. Passages are
    taken best first while they fit in budget tokens (with a chat style: as the user's message in it, which is
    then the text); the first that does not fit is cut to the room left (if 32 tokens or more) and the rest are
    dropped. notes says what was trimmed."""
    head = "Answer the question using only the numbered passages. Cite them like [1].\n\n"
    tail = f"Question: {question}\nAnswer:"
    chat = style is not None and style.name != 'plain'
    fixed = len(style.encode_prompt([{'role': 'user', 'content': head + tail}]) if chat else tok.encode(head + tail))
    if fixed >= budget:
        raise UserError(f"the question alone takes {fixed} tokens of the {budget} the context leaves: shorten "
                        f"it or lower --max_new_tokens")
    room, body, notes = budget - fixed, [], []
    for n, (chunk, _) in enumerate(passages, 1):
        text = f"[{n}] ({chunk['source']}) {chunk['text'].strip()}\n\n"
        ids = tok.encode(text)
        if len(ids) <= room:
            body.append(text)
            room -= len(ids)
        elif room >= 32:
            body.append(tok.decode(ids[:room - 2]) + '\n\n')
            notes.append(f"[{n}] cut from {len(ids)} to {room - 2} tokens")
            room = 0
        else:
            notes.append(f"[{n}] dropped")
    return head + ''.join(body) + tail, notes


def ask(idx, cfg, question, out=sys.stdout):
    """Retrieve, build the prompt, stream the answer, list the sources. Returns (answer, passages, notes)."""
    model, tok = load_model(cfg.init_from, resolve_device(cfg.device), trust=cfg.trust_checkpoint)
    tok = tok.tolerant()
    (hits,) = idx.search([question], cfg.top_k, cfg.retriever, cfg.rrf_k, cfg.dense_weight)
    passages = [(idx.chunks[i], s) for i, s in hits]
    max_new = min(cfg.max_new_tokens, model.config.block_size // 2)
    style = chat_style(tok)
    prompt, notes = build_prompt(question, passages, tok, model.config.block_size - max_new, style)
    if notes:
        print(f"note: passages trimmed to fit the {model.config.block_size}-token context: {'; '.join(notes)}",
              file=sys.stderr)
    stop = style.stop if style.name != 'plain' else ['\nQuestion:']
    # the passages and the question are text: special tokens' text in a document is not a control token
    ids = style.encode_prompt([{'role': 'user', 'content': prompt}]) if style.name != 'plain' else \
        tok.encode_parts([prompt])
    steps = model.generate_stream([ids], max_new, temperature=cfg.temperature, top_p=cfg.top_p,
                                  eos_id=tok.eos_id, stop=stop, decode=tok.decode, seed=cfg.seed)
    answer = ''
    for piece in stream_text(steps, tok, stop):
        answer += piece
        out.write(piece)
        out.flush()
    dropped = {note.split(']')[0] + ']' for note in notes if note.endswith('dropped')}
    out.write('\n\nSources:\n' + ''.join(f"[{n}] {c['source']} (characters {c['start']}-{c['end']}, score {s:.3f})"
                                         + (" - not in the prompt: it did not fit\n" if f"[{n}]" in dropped else "\n")
                                         for n, (c, s) in enumerate(passages, 1)))
    return answer, passages, notes


# ----------------------------------------------------------------------------------------------------------
# evaluation: recall@k and MRR against gold sources or answer strings

def read_qa(path):
    """Questions from JSONL (or a JSON array): each needs a 'question' and a 'source' or 'answers' to judge by."""
    items = read_json_records(path, '--qa')
    for n, rec in enumerate(items, 1):
        if not isinstance(rec.get('question'), str) or not (rec.get('source') or rec.get('answers')):
            raise UserError(f"{path} record {n} needs a 'question' string and a 'source' or 'answers' to judge by")
    return items


def is_hit(chunk, item):
    if item.get('source'):
        return chunk['source'] == item['source'] or chunk['source'].rsplit(':', 1)[0] == item['source']
    text = chunk['text'].lower()
    return any(a.lower() in text for a in item['answers'])


def evaluate(idx, items, retriever='auto', rrf_k=60, dense_weight=1.0):
    """recall@1/5/10 (a hit among the first k chunks) and MRR (1 / rank of the first hit in the top 10, else
    0), over the questions; also queries/s of the retrieval."""
    t0 = time.perf_counter()
    results = idx.search([it['question'] for it in items], 10, retriever, rrf_k, dense_weight)
    dt = time.perf_counter() - t0
    first = []
    for item, hits in zip(items, results):
        ranks = [r for r, (c, _) in enumerate(hits, 1) if is_hit(idx.chunks[c], item)]
        first.append(ranks[0] if ranks else None)
    n = len(items)
    report = {f'recall@{k}': sum(r is not None and r <= k for r in first) / n for k in (1, 5, 10)}
    report.update(mrr=sum(1 / r for r in first if r) / n, n=n, queries_per_sec=n / dt)
    return report


# ----------------------------------------------------------------------------------------------------------
# command line

def main(argv):
    commands = ('index', 'query', 'ask', 'eval', 'tune')
    if not argv or argv[0] not in commands:
        raise UserError(f"usage: python rag.py {{{'|'.join(commands)}}} [--key=value ...] [\"question\"]")
    command, rest = argv[0], argv[1:]
    options = [a for a in rest if a.startswith('--') or (a.endswith('.py') and os.path.isfile(a))]
    question = ' '.join(a for a in rest if a not in options).strip()
    cfg = parse_config(RagConfig, options)
    if command == 'index':
        writable_dir(cfg.index, 'index')
    writable_dir(cfg.out_dir, 'out_dir')
    writable_file(cfg.report, 'report')
    if command == 'index':
        if not cfg.docs:
            raise UserError("index needs --docs=FOLDER, FILE or 'GLOB'")
        exists = os.path.isfile(os.path.join(cfg.index, 'index.json'))
        idx = Index.load(cfg.index) if exists else Index(cfg)
        idx.trust = cfg.trust_checkpoint
        if exists and cfg.embed_from and cfg.embed_from != idx.settings['embed_from']:
            raise UserError(f"'{cfg.index}' was built with embed_from='{idx.settings['embed_from']}': use a new "
                            f"--index folder for another embedding model")
        t0 = time.time()
        counts = idx.update(cfg.docs, cfg.batch_size)
        if not idx.chunks:
            raise UserError(f"no readable text in '{cfg.docs}' (files with {', '.join(EXTENSIONS)})")
        idx.save(cfg.index)
        print(f"indexed {len(idx.files)} files, {len(idx.chunks):,} chunks, {len(idx.vocab):,} terms in "
              f"{time.time() - t0:.1f}s: " + ', '.join(f"{v} {k}" for k, v in counts.items())
              + (f"; dense vectors from {idx.settings['embed_from']}" if idx.dense is not None else ''))
        return counts
    idx = Index.load(cfg.index)
    idx.trust = cfg.trust_checkpoint
    stale = idx.stale()
    if stale:
        print(f"note: {len(stale)} source file(s) changed since indexing ({', '.join(stale[:3])}): run "
              f"`python rag.py index --docs=... --index={cfg.index}` again", file=sys.stderr)
    if command == 'tune':
        if not (cfg.embed_from and cfg.out_dir):
            raise UserError("tune needs --embed_from=CHECKPOINT (the model to start from) and --out_dir=DIR")
        tune(idx, cfg)
        print(f"wrote {cfg.out_dir}/ckpt.pt; index with it: python rag.py index --docs=... --index=NEW_DIR "
              f"--embed_from={cfg.out_dir}")
        return cfg.out_dir
    if command in ('query', 'ask') and not question:
        raise UserError(f"{command} needs a question: python rag.py {command} --index={cfg.index} \"...\"")
    if command == 'query':
        (hits,) = idx.search([question], cfg.top_k, cfg.retriever, cfg.rrf_k, cfg.dense_weight)
        for n, (i, s) in enumerate(hits, 1):
            c = idx.chunks[i]
            print(f"[{n}] {s:.4f}  {c['source']} (characters {c['start']}-{c['end']})\n    "
                  + ' '.join(c['text'].split())[:300] + '\n')
        return hits
    if command == 'ask':
        if not cfg.init_from:
            raise UserError("ask needs --init_from=CHECKPOINT: the model that answers")
        return ask(idx, cfg, question)
    if not cfg.qa:
        raise UserError("eval needs --qa=FILE.jsonl of {question, answers?, source?}")
    report = evaluate(idx, read_qa(cfg.qa), cfg.retriever, cfg.rrf_k, cfg.dense_weight)
    print(', '.join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in report.items()))
    if cfg.report:
        with atomic_write(cfg.report) as f:
            json.dump({**report, 'retriever': cfg.retriever, 'index': cfg.index, 'qa': cfg.qa,
                       'settings': asdict(cfg)}, f, indent=2)
    return report


if __name__ == '__main__':
    run_cli(main)
