// Score every CURRENT model of a registry with onnxruntime-node and compare with golden.json.
//
// Usage: node score.mjs <registry-dir>
// Registry layout: <registry>/<family>/CURRENT holds a version; <registry>/<family>/<version>/
// holds model.onnx and golden.json (inputs, dtypes, shapes and Python onnxruntime outputs).
// Prints one JSON line per family: {family, version, outputs: {name: {dtype, shape, data}},
// max_abs_diff} or {family, error}. Exits 1 if any family failed: never skips silently.
import fs from "node:fs";
import path from "node:path";
import ort from "onnxruntime-node";

const TYPED = {
  int64: (data) => BigInt64Array.from(data, (v) => BigInt(v)),
  float32: (data) => Float32Array.from(data),
  bool: (data) => Uint8Array.from(data, (v) => (v ? 1 : 0)),
};

function toTensor(name, spec) {
  const make = TYPED[spec.dtype];
  if (!make) throw new Error(`input ${name}: unsupported dtype ${spec.dtype}`);
  const flat = spec.shape.length ? spec.data.flat(spec.shape.length) : [spec.data];
  return new ort.Tensor(spec.dtype, make(flat), spec.shape);
}

// Typed array -> nested JS arrays shaped like dims (BigInt ids become Numbers: ids < 2^53).
function nest(flat, dims) {
  if (dims.length === 0) return flat[0];
  const [head, ...rest] = dims;
  const step = rest.reduce((a, b) => a * b, 1);
  return Array.from({ length: head }, (_, i) => nest(flat.slice(i * step, (i + 1) * step), rest));
}

function maxAbsDiff(got, want) {
  const g = [got].flat(Infinity);
  const w = [want].flat(Infinity);
  if (g.length !== w.length) return Infinity;
  return g.reduce((m, v, i) => Math.max(m, Math.abs(v - w[i])), 0);
}

async function scoreFamily(registry, family) {
  const currentFile = path.join(registry, family, "CURRENT");
  if (!fs.existsSync(currentFile)) throw new Error(`no CURRENT file in ${path.join(registry, family)}`);
  const version = fs.readFileSync(currentFile, "utf8").trim();
  const dir = path.join(registry, family, version);
  const golden = JSON.parse(fs.readFileSync(path.join(dir, "golden.json"), "utf8"));
  const session = await ort.InferenceSession.create(path.join(dir, "model.onnx"));
  const feeds = {};
  for (const name of session.inputNames) {
    if (!(name in golden.inputs)) throw new Error(`golden.json has no input ${name}`);
    feeds[name] = toTensor(name, golden.inputs[name]);
  }
  const results = await session.run(feeds);
  const outputs = {};
  let worst = 0;
  for (const name of session.outputNames) {
    const t = results[name];
    const flat = Array.from(t.data, (v) => (typeof v === "bigint" ? Number(v) : v));
    outputs[name] = { dtype: t.type, shape: t.dims.map(Number), data: nest(flat, t.dims.map(Number)) };
    if (golden.outputs[name]) worst = Math.max(worst, maxAbsDiff(outputs[name].data, golden.outputs[name].data));
    else worst = Infinity;
  }
  return { family, version, outputs, max_abs_diff: worst };
}

async function main() {
  const registry = process.argv[2];
  if (!registry || !fs.existsSync(registry)) {
    console.error("usage: node score.mjs <registry-dir>");
    process.exit(2);
  }
  const families = fs
    .readdirSync(registry, { withFileTypes: true })
    .filter((d) => d.isDirectory() && !d.name.startsWith("."))
    .map((d) => d.name)
    .sort();
  let failed = 0;
  for (const family of families) {
    try {
      console.log(JSON.stringify(await scoreFamily(registry, family)));
    } catch (err) {
      failed += 1;
      console.log(JSON.stringify({ family, error: String(err && err.message ? err.message : err) }));
    }
  }
  // exitCode, not process.exit(): exit() drops whatever of a large stdout write is still
  // queued for a pipe (a top-K family's golden scores are hundreds of kB).
  process.exitCode = failed ? 1 : 0;
}

await main();
