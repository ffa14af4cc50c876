// Runs textrnn.js in Node for the tests: reads one JSON job on stdin, prints one JSON answer.
//   {"module": "<export>/textrnn.js", "ort": "<dir holding node_modules/onnxruntime-node>", "tasks": [...]}
// Tasks: {"generate": {options}, "model": dir} -> text; {"filter": {logits, options}} -> {ids, probs};
// {"draws": {probs, seed, n}} -> counts; {"predict": {feed, options}, "model": dir} -> predict()'s answer.
import { createRequire } from "node:module";
import { pathToFileURL } from "node:url";

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const job = JSON.parse(Buffer.concat(chunks).toString("utf-8"));
const lib = await import(pathToFileURL(job.module).href);
const ort = job.ort ? createRequire(job.ort + "/")("onnxruntime-node") : undefined;
const models = new Map();
async function model(dir) {
  if (!models.has(dir)) models.set(dir, await lib.TextRNN.load(dir, ort ? { ort } : {}));
  return models.get(dir);
}
const answers = [];
for (const task of job.tasks) {
  try {
    if (task.generate) {
      const m = await model(task.model);
      const start = performance.now();
      const text = await m.generate(task.generate);
      answers.push({ text, seconds: (performance.now() - start) / 1000 });
    } else if (task.stream) {
      const m = await model(task.model);
      const pieces = [];
      for await (const piece of m.stream(task.stream)) pieces.push(piece);
      answers.push({ pieces });
    } else if (task.filter) {
      const odd = { nan: NaN, inf: Infinity, "-inf": -Infinity }; // JSON has no NaN or infinity
      const logits = Float32Array.from(task.filter.logits, (v) => (typeof v === "string" ? odd[v] : v));
      const { ids, probs } = lib.filterLogits(logits, task.filter.options);
      answers.push({ ids: Array.from(ids), probs: Array.from(probs) });
    } else if (task.pick) {
      answers.push({ picks: task.pick.draws.map((u) => lib.pick(Float64Array.from(task.pick.probs), u)) });
    } else if (task.draws) {
      const random = new lib.Random(task.draws.seed);
      const probs = Float64Array.from(task.draws.probs);
      const counts = new Array(probs.length).fill(0);
      for (let i = 0; i < task.draws.n; i++) counts[lib.pick(probs, random.next())]++;
      answers.push({ counts });
    } else if (task.predict) {
      const m = await model(task.model);
      m.reset();
      if (task.predict.feed !== undefined) await m.feed(task.predict.feed);
      answers.push(await m.predict(task.predict.options || {}));
    } else {
      throw new Error(`unknown task ${JSON.stringify(task)}`);
    }
  } catch (error) {
    answers.push({ error: String(error.message || error) });
  }
}
process.stdout.write(JSON.stringify(answers));
