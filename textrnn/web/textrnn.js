// textrnn.js: sample a textrnn model in a web page or in Node.js, over ONNX Runtime.
//
// An ES module with no build step and no dependency but ONNX Runtime (onnxruntime-web in a
// browser, onnxruntime-node in Node). It reads a folder written by `textrnn export --format web`:
// model.onnx (one token step), tokenizer.json and config.json.
//
//   import { TextRNN } from "./textrnn.js";
//   const model = await TextRNN.load("./");               // the folder's URL (or path, in Node)
//   const text = await model.generate({ prompt: "ROMEO:", length: 200, temperature: 0.8, seed: 1 });
//   for await (const piece of model.stream({ prompt: "ROMEO:" })) { ... }
//   model.reset(); await model.feed("To be"); const { sample, probabilities } = await model.predict();
//
// The sampling rule is textrnn's (textrnn/sampling.py): temperature 0 is greedy, top-k keeps the
// k most likely tokens, top-p then the smallest set, most likely first, whose probability reaches
// p; a repetition penalty > 1 divides the positive logits (multiplies the negative ones) of every
// id seen in the prompt and the sample, as in CTRL. A char model never generates its unknown id.
// Greedy text is the same as `textrnn generate --temperature 0`; a seed gives the same text
// every time here, but not the same as Python's (another random number generator).

export const VERSION = "1";
const EXPORT_FORMAT = "textrnn-onnx";
const GREEDY_BELOW = 1e-30; // temperatures this small are greedy, as in Python
const YIELD_MS = 25; // a browser stream gives the page its event loop at least this often

const isNode = typeof process !== "undefined" && !!(process.versions && process.versions.node);

// ------------------------------------------------------------------ sampling

/** Check the sampling settings as Python does; throws a RangeError naming the first bad one. */
export function checkSettings({ temperature = 1, topK = 0, topP = 1, repetitionPenalty = 1 } = {}) {
  if (typeof temperature !== "number" || !(temperature >= 0) || !Number.isFinite(temperature))
    throw new RangeError(`temperature must be a finite number >= 0 (0 = greedy), got ${temperature}`);
  if (!Number.isInteger(topK) || topK < 0)
    throw new RangeError(`topK must be an integer >= 0 (0 = off), got ${topK}`);
  if (typeof topP !== "number" || !(topP > 0 && topP <= 1))
    throw new RangeError(`topP must be in (0, 1] (1 = off), got ${topP}`);
  if (typeof repetitionPenalty !== "number" || !(repetitionPenalty > 0) || !Number.isFinite(repetitionPenalty))
    throw new RangeError(`repetitionPenalty must be a positive number (1 = off), got ${repetitionPenalty}`);
}

/** Logits whose maximum is 0: NaN never wins, +inf entries share all the probability, nothing finite is uniform. */
function safeLogits(logits) {
  const n = logits.length;
  const out = new Float64Array(n);
  let posInf = false;
  let max = -Infinity;
  for (let i = 0; i < n; i++) {
    const v = Number.isNaN(logits[i]) ? -Infinity : logits[i];
    out[i] = v;
    if (v === Infinity) posInf = true;
    else if (v > max) max = v;
  }
  if (posInf) {
    for (let i = 0; i < n; i++) out[i] = out[i] === Infinity ? 0 : -Infinity;
    return out;
  }
  if (max === -Infinity) return out.fill(0);
  for (let i = 0; i < n; i++) out[i] -= max;
  return out;
}

/**
 * What a draw picks from: { ids, probs }, the kept ids most likely first (ties: the lower id
 * first) and their probabilities, which sum to 1. The same rule as Python's
 * `textrnn.sampling.filtered_probabilities`.
 */
export function filterLogits(logits, { temperature = 1, topK = 0, topP = 1 } = {}) {
  checkSettings({ temperature, topK, topP });
  const safe = safeLogits(logits);
  const n = safe.length;
  const order = Array.from({ length: n }, (_, i) => i).sort((a, b) => safe[b] - safe[a] || a - b);
  if (temperature < GREEDY_BELOW) return { ids: Int32Array.of(order[0]), probs: Float64Array.of(1) };
  const k = topK > 0 && topK < n ? topK : n;
  const probs = new Float64Array(k);
  let total = 0;
  for (let r = 0; r < k; r++) total += probs[r] = Math.exp(safe[order[r]] / temperature);
  let kept = k;
  if (topP < 1) {
    let above = 0;
    kept = 0;
    while (kept < k && above / total < topP) above += probs[kept++];
    kept = Math.max(kept, 1);
  }
  let keptTotal = 0;
  for (let r = 0; r < kept; r++) keptTotal += probs[r];
  const out = new Float64Array(kept);
  for (let r = 0; r < kept; r++) out[r] = probs[r] / keptTotal;
  return { ids: Int32Array.from(order.slice(0, kept)), probs: out };
}

/** The index picked by inverse CDF for a uniform `u` in (0, 1]: the first whose running sum reaches u. */
export function pick(probs, u) {
  let sum = 0;
  for (let i = 0; i < probs.length; i++) {
    sum += probs[i];
    if (sum >= u) return i;
  }
  return probs.length - 1;
}

/** CTRL's repetition penalty, in place, on the ids marked in `seen`. */
function penalize(logits, seen, penalty) {
  for (let i = 0; i < logits.length; i++)
    if (seen[i]) logits[i] = logits[i] > 0 ? logits[i] / penalty : logits[i] * penalty;
}

function argmax(values) {
  let best = 0;
  for (let i = 1; i < values.length; i++) if (values[i] > values[best]) best = i;
  return best;
}

/**
 * A seeded random number generator: xoshiro128** seeded through splitmix64, so every seed, even
 * 0, starts well mixed. `next()` gives a uniform number in (0, 1] with 53 random bits.
 * Without a seed it is seeded from the platform's cryptographic random numbers.
 */
export class Random {
  constructor(seed) {
    let x = seed === undefined || seed === null ? randomSeed() : BigInt(seed);
    if (x < 0n || x >= 1n << 64n) throw new RangeError(`seed must be an integer from 0 to 2**64 - 1, got ${seed}`);
    const mask = (1n << 64n) - 1n;
    const words = [];
    for (let i = 0; i < 2; i++) {
      x = (x + 0x9e3779b97f4a7c15n) & mask;
      let z = x;
      z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & mask;
      z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & mask;
      z ^= z >> 31n;
      words.push(Number(z & 0xffffffffn), Number(z >> 32n));
    }
    this.s = Uint32Array.from(words);
  }

  nextUint32() {
    const s = this.s;
    const result = Math.imul(rotl(Math.imul(s[1], 5), 7), 9) >>> 0;
    const t = s[1] << 9;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 11);
    return result;
  }

  next() {
    const hi = this.nextUint32() >>> 5; // 27 bits
    const lo = this.nextUint32() >>> 6; // 26 bits
    return 1 - (hi * 67108864 + lo) / 9007199254740992; // (0, 1]
  }
}

function rotl(x, k) {
  return (x << k) | (x >>> (32 - k));
}

function randomSeed() {
  const words = new Uint32Array(2);
  globalThis.crypto.getRandomValues(words);
  return (BigInt(words[0]) << 32n) | BigInt(words[1]);
}

// ------------------------------------------------------------------ tokenizers

/** Characters (Unicode code points, one id each, the last id unknown) or UTF-8 bytes. */
export class Tokenizer {
  constructor(spec) {
    this.kind = spec.kind;
    this.vocabSize = spec.vocab_size;
    if (this.kind === "char") {
      this.chars = Array.from(spec.chars);
      this.index = new Map(this.chars.map((c, i) => [c, i]));
      this.unkId = this.chars.length;
    } else if (this.kind === "byte") {
      this.unkId = null;
    } else {
      throw new Error(`textrnn.js reads char and byte tokenizers, not ${this.kind}`);
    }
  }

  /** Ids of `text`; a character outside a char vocabulary throws (unknown: "skip" drops it). */
  encode(text, unknown = "error") {
    if (this.kind === "byte") return Array.from(new TextEncoder().encode(text));
    const ids = [];
    const missing = new Set();
    for (const c of text) {
      const id = this.index.get(c);
      if (id !== undefined) ids.push(id);
      else if (unknown !== "skip") missing.add(c);
    }
    if (missing.size) {
      const shown = [...missing].slice(0, 5).map((c) => JSON.stringify(c)).join(", ");
      throw new Error(`the prompt has characters the model never saw: ${shown} (use unknown: "skip" to drop them)`);
    }
    return ids;
  }

  /** The text of one id (char), or a label for a byte ("a", or "<0xE2>" outside ASCII). */
  token(id) {
    if (this.kind === "char") return id < this.chars.length ? this.chars[id] : "\ufffd";
    return id < 128 ? String.fromCharCode(id) : `<0x${id.toString(16).toUpperCase().padStart(2, "0")}>`;
  }

  /** A decoder that turns ids, one at a time, into whole characters. */
  decoder() {
    if (this.kind === "char") return { push: (id) => this.token(id) };
    const utf8 = new TextDecoder("utf-8", { fatal: false });
    return { push: (id) => utf8.decode(Uint8Array.of(id), { stream: true }) };
  }
}

/** The text after `tail` up to and including the earliest stop string that ends in `piece`, and whether one did. */
function cutAtStop(tail, piece, stops) {
  const text = tail + piece;
  let best = -1;
  for (const s of stops) {
    const at = text.indexOf(s, Math.max(0, tail.length - s.length + 1));
    if (at >= 0 && (best < 0 || at + s.length < best)) best = at + s.length;
  }
  return best < 0 ? [piece, false] : [text.slice(tail.length, best), true];
}

// ------------------------------------------------------------------ loading

async function readFile(base, name, kind) {
  if (isNode && base.startsWith("file:")) {
    const { readFile } = await import("node:fs/promises");
    const data = await readFile(new URL(name, base));
    return kind === "json" ? JSON.parse(data.toString("utf-8")) : new Uint8Array(data);
  }
  const url = new URL(name, base);
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: ${response.status} ${response.statusText}`);
  return kind === "json" ? response.json() : new Uint8Array(await response.arrayBuffer());
}

/** The folder's URL, ending in "/": relative to the page in a browser; a path or URL in Node. */
async function baseURL(url) {
  const text = String(url);
  if (isNode && !/^(https?|file):/.test(text)) {
    const { pathToFileURL } = await import("node:url");
    const href = pathToFileURL(text).href;
    return href.endsWith("/") ? href : href + "/";
  }
  const dir = text.endsWith("/") ? text : text + "/";
  return new URL(dir, globalThis.location ? globalThis.location.href : undefined).href;
}

async function loadRuntime(config, base) {
  if (isNode) {
    try {
      const ort = await import("onnxruntime-node");
      return ort.InferenceSession ? ort : ort.default; // a CommonJS package: its exports may be on default
    } catch (error) {
      const version = config.web?.onnxruntime_web ? `@${config.web.onnxruntime_web}` : "";
      throw new Error(`textrnn.js in Node needs onnxruntime-node (npm install onnxruntime-node${version}), ` +
        `or pass { ort } to TextRNN.load (${error.message})`);
    }
  }
  // the bundle finds its wasm binary beside itself (import.meta.url): in the export's ort/, or on the CDN
  const ort = await import(new URL(config.web.runtime, base).href);
  ort.env.wasm.numThreads = 1; // one token at a time: a second thread only adds hand-offs
  return ort;
}

/** A task's pause, so that the page can paint and take clicks: a message to ourselves (setTimeout
 * would do, but browsers hold a nested one back 4 ms; scheduler.yield resumes ahead of other work). */
function yieldToPage() {
  return new Promise((resolve) => {
    const channel = new MessageChannel();
    channel.port1.onmessage = () => resolve();
    channel.port2.postMessage(null);
  });
}

// ------------------------------------------------------------------ the model

export class TextRNN {
  /**
   * Load an exported model from a folder: a URL in a browser (relative to the page), a path or
   * URL in Node. Options: `ort`, an ONNX Runtime module to use (onnxruntime-web or -node).
   */
  static async load(url = "./", options = {}) {
    const base = await baseURL(url);
    const config = await readFile(base, "config.json", "json");
    if (config.format !== EXPORT_FORMAT) throw new Error(`${base}config.json: not a textrnn export`);
    const [tokenizer, bytes] = await Promise.all([readFile(base, "tokenizer.json", "json"),
      readFile(base, "model.onnx", "bytes")]);
    const ort = options.ort ?? (await loadRuntime(config, base));
    const session = await ort.InferenceSession.create(bytes, {
      executionProviders: [isNode ? "cpu" : "wasm"], graphOptimizationLevel: "all",
      intraOpNumThreads: 1, interOpNumThreads: 1,
    });
    return new TextRNN(ort, session, config, new Tokenizer(tokenizer));
  }

  constructor(ort, session, config, tokenizer) {
    this.ort = ort;
    this.session = session;
    this.config = config;
    this.tokenizer = tokenizer;
    const model = config.model;
    this.cell = model.cell;
    this.stateSize = model.num_layers * model.hidden_size;
    this.stateDims = [model.num_layers, 1, model.hidden_size];
    this.vocabSize = model.vocab_size;
    // a char model never generates its unknown id (the last one)
    this.allowed = tokenizer.unkId === this.vocabSize - 1 ? this.vocabSize - 1 : this.vocabSize;
    this.precision = config.precision ?? "fp32";
    this.reset();
  }

  /** The state of a fresh model: zeros. */
  freshState() {
    const zeros = () => new this.ort.Tensor("float32", new Float32Array(this.stateSize), this.stateDims);
    return this.cell === "lstm" ? { h: zeros(), c: zeros() } : { h: zeros() };
  }

  /** One token step: { logits (Float32Array [vocab]), state }. */
  async step(id, state) {
    const feeds = { ids: new this.ort.Tensor("int64", BigInt64Array.of(BigInt(id)), [1]), h: state.h };
    if (state.c) feeds.c = state.c;
    const out = await this.session.run(feeds);
    const next = this.cell === "lstm" ? { h: out.h_out, c: out.c_out } : { h: out.h_out };
    return { logits: out.logits.data, state: next };
  }

  /** Logits after `ids` from a fresh state. Empty: after an implicit newline, as in Python. */
  async start(ids) {
    let state = this.freshState();
    if (!ids.length) {
      const newline = this.tokenizer.kind === "byte" ? [10] : this.tokenizer.index.has("\n") ? [this.tokenizer.index.get("\n")] : [];
      if (!newline.length) return { logits: new Float32Array(this.vocabSize), state };
      ids = newline;
    }
    let logits;
    for (const id of ids) ({ logits, state } = await this.step(id, state));
    return { logits, state };
  }

  // -------------------------------------------------------------- ml5-style state

  /** Forget what `feed` read: the next `predict` starts from a fresh state. */
  reset() {
    this.context = null; // { logits, state } after the text fed so far
    this.fed = [];
  }

  /** Read `text` into the model's state (after what was fed before). */
  async feed(text, { unknown = "error" } = {}) {
    const ids = this.tokenizer.encode(String(text), unknown);
    if (!this.context) {
      this.context = await this.start(ids);
    } else {
      for (const id of ids) this.context = await this.step(id, this.context.state);
    }
    this.fed.push(...ids);
  }

  /**
   * The next token's probabilities after the text fed so far: { sample, probabilities }, the
   * probabilities ({ char, id, probability }) most likely first, at `temperature`, with a
   * `sample` drawn from them (options: temperature, topK, topP, seed).
   */
  async predict({ temperature = 1, topK = 0, topP = 1, seed } = {}) {
    if (!this.context) this.context = await this.start([]);
    const { ids, probs } = filterLogits(this.context.logits.subarray(0, this.allowed), {
      temperature: temperature < GREEDY_BELOW ? 1 : temperature, topK, topP,
    });
    const probabilities = Array.from(ids, (id, r) => ({ char: this.tokenizer.token(id), id, probability: probs[r] }));
    const sample = temperature < GREEDY_BELOW ? probabilities[0] : probabilities[pick(probs, new Random(seed).next())];
    return { sample: sample.char, probabilities };
  }

  // -------------------------------------------------------------- generation

  /** A continuation of `prompt` (not repeating it): a promise of the text. Options as `stream`. */
  async generate(options = {}) {
    let text = "";
    for await (const piece of this.stream(options)) text += piece;
    return text;
  }

  /**
   * Yield the continuation of `prompt` as it is made, a piece per whole character. Options:
   * prompt (""), length (500 tokens), temperature (1; 0 is greedy), topK (0, off), topP (1, off),
   * repetitionPenalty (1, off), seed, stop (a string or strings: the text ends with the first
   * one), unknown ("error" or "skip": a prompt character the model never saw), signal (an
   * AbortSignal that ends the stream). Each call starts from a fresh state.
   */
  async *stream({ prompt = "", length = 500, temperature = 1, topK = 0, topP = 1, repetitionPenalty = 1,
    seed, stop = [], unknown = "error", signal } = {}) {
    checkSettings({ temperature, topK, topP, repetitionPenalty });
    if (!Number.isInteger(length) || length < 0) throw new RangeError(`length must be an integer >= 0, got ${length}`);
    const stops = typeof stop === "string" ? [stop] : Array.from(stop);
    if (stops.some((s) => typeof s !== "string" || !s)) throw new RangeError("stop strings must be non-empty strings");
    const ids = this.tokenizer.encode(String(prompt), unknown);
    if (!length) return;
    const greedy = temperature < GREEDY_BELOW;
    const random = new Random(seed);
    const decoder = this.tokenizer.decoder();
    const keep = Math.max(0, ...stops.map((s) => s.length));
    const seen = repetitionPenalty !== 1 ? new Uint8Array(this.allowed) : null;
    if (seen) for (const id of ids) if (id < this.allowed) seen[id] = 1;
    let { logits, state } = await this.start(ids);
    let tail = "";
    let lastYield = Date.now();
    for (let position = 0; position < length; position++) {
      if (signal?.aborted) return;
      let row = logits.subarray(0, this.allowed);
      let token;
      if (greedy && !seen) {
        token = argmax(row);
      } else {
        if (seen) {
          row = Float64Array.from(row);
          penalize(row, seen, repetitionPenalty);
        }
        const { ids: kept, probs } = filterLogits(row, { temperature, topK, topP });
        token = kept[greedy ? 0 : pick(probs, random.next())];
        if (seen) seen[token] = 1;
      }
      let piece = decoder.push(token);
      let done = false;
      if (stops.length && piece) {
        [piece, done] = cutAtStop(tail, piece, stops);
        tail = (tail + piece).slice(-keep);
      }
      if (!done && position + 1 < length) ({ logits, state } = await this.step(token, state));
      if (piece) yield piece;
      if (done) return;
      if (!isNode && Date.now() - lastYield > YIELD_MS) {
        await yieldToPage(); // let the page paint and take clicks
        lastYield = Date.now();
      }
    }
  }
}

export default TextRNN;
