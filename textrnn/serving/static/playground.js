// The playground: streams /v1/completions (server-sent events) into the page. No dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const sliders = ["temperature", "top_k", "top_p", "length"];
let controller = null;
let scored = [];  // with "show probabilities": each shown token's [text, logprob, top], by span index

function probabilityColour(p) {  // by surprisal, as textrnn inspect: 0 bits white, 8 bits or more deep red
  const t = Math.min(1, Math.max(0, -Math.log2(p) / 8));
  return `rgb(255, ${Math.round(255 - 190 * t)}, ${Math.round(255 - 210 * t)})`;
}

function addScored(logprobs) {
  const frag = document.createDocumentFragment();
  logprobs.tokens.forEach((token, i) => {
    const span = document.createElement("span");
    span.textContent = token.startsWith("bytes:") ? "" : token;
    span.dataset.i = scored.length;
    span.style.background = probabilityColour(Math.exp(logprobs.token_logprobs[i]));
    scored.push([token, logprobs.token_logprobs[i], logprobs.top_logprobs[i] || {}]);
    frag.appendChild(span);
  });
  $("text").appendChild(frag);
}

function showTip(event) {
  const i = event.target.dataset ? event.target.dataset.i : undefined, tip = $("tip");
  if (i === undefined) { tip.hidden = true; return; }
  const [token, logprob, top] = scored[Number(i)];
  const lines = [`${JSON.stringify(token)}  ${(100 * Math.exp(logprob)).toFixed(1)}%`];
  for (const [t, lp] of Object.entries(top)) lines.push(`  ${JSON.stringify(t).padEnd(6)} ${(100 * Math.exp(lp)).toFixed(1)}%`);
  tip.textContent = lines.join("\n");
  tip.hidden = false;
  tip.style.left = Math.min(event.clientX + 12, innerWidth - 200) + "px";
  tip.style.top = (event.clientY + 14) + "px";
}

function showValues() {
  for (const name of sliders) {
    const value = Number($(name).value);
    const text = name === "top_k" && value === 0 ? "off" : name === "top_p" && value >= 1 ? "off"
      : name === "temperature" && value === 0 ? "greedy" : String(value);
    $(name + "-value").textContent = text;
  }
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function status(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

async function loadModels() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
    $("model").replaceChildren(...body.data.map((m) => new Option(`${m.id} (${m.cell} ${m.num_layers}x${m.hidden_size})`, m.id)));
    status("");
  } catch (error) {
    status("models: " + error.message, true);
  }
}

function running(on) {
  $("generate").disabled = on;
  $("stop").disabled = !on;
  $("output").classList.toggle("running", on);
}

async function generate() {
  if (controller) return;
  const prompt = $("prompt").value;
  $("echo").textContent = prompt;
  $("text").textContent = "";
  scored = [];
  const probabilities = $("probabilities").checked;
  const request = {
    model: $("model").value || undefined, prompt, stream: true,
    max_tokens: Number($("length").value), temperature: Number($("temperature").value),
    top_k: Number($("top_k").value), top_p: Number($("top_p").value), unknown: "skip",
  };
  if (probabilities) request.logprobs = 5;
  if ($("seed").value !== "") request.seed = Number($("seed").value);
  controller = new AbortController();
  running(true);
  status("generating…");
  const started = performance.now();
  let chars = 0;
  try {
    const response = await fetch("/v1/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(request), signal: controller.signal });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : response.statusText);
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "", reason = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      const events = buffer.split("\n\n");
      buffer = events.pop();
      for (const event of events) {
        const data = event.replace(/^data: /, "");
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const choice = chunk.choices[0];
        if (probabilities && choice.logprobs) addScored(choice.logprobs);
        else $("text").append(choice.text);
        chars += choice.text.length;
        if (choice.finish_reason) reason = choice.finish_reason;
        $("output").scrollTop = $("output").scrollHeight;
      }
    }
    const seconds = (performance.now() - started) / 1000;
    status(`${chars} characters in ${seconds.toFixed(1)} s (finish: ${reason || "done"})`);
  } catch (error) {
    if (error.name === "AbortError") status(`stopped after ${chars} characters`);
    else status(error.message, true);
  } finally {
    controller = null;
    running(false);
  }
}

function stop() {
  if (controller) controller.abort();
}

document.addEventListener("DOMContentLoaded", () => {
  for (const name of sliders) $(name).addEventListener("input", showValues);
  showValues();
  $("generate").addEventListener("click", generate);
  $("stop").addEventListener("click", stop);
  $("key").addEventListener("change", loadModels);
  $("text").addEventListener("mouseover", showTip);
  $("text").addEventListener("mouseleave", () => { $("tip").hidden = true; });
  $("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate(); });
  loadModels();
});
