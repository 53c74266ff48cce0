// FederiMed web app: the clinician page's two forms and the live run page. No framework, no
// CDN: this file is all the script there is.
"use strict";

function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message;
  box.hidden = !message;
}

// Signed out meanwhile (the session ended, the token was revoked): to the login page.
function signedOut(response) {
  if (response.status !== 401) return false;
  location.href = "/login?next=" + encodeURIComponent(location.pathname);
  return true;
}

async function problem(response) {
  try {
    const body = await response.json();
    return body.detail || response.statusText;
  } catch (_) {
    return response.statusText;
  }
}

function prediction(item) {
  const li = document.createElement("li");
  li.className = "prediction";
  const head = document.createElement("div");
  head.className = "prediction-head";
  const label = document.createElement("span");
  const code = document.createElement("span");
  code.className = "code";
  code.textContent = item.code;
  label.append(code, item.name);
  const percent = document.createElement("span");
  percent.className = "probability";
  percent.textContent = (100 * item.probability).toFixed(1) + "%";
  head.append(label, percent);
  const bar = document.createElement("div");
  bar.className = "bar";
  const fill = document.createElement("span");
  fill.style.width = (100 * item.probability).toFixed(1) + "%";
  bar.append(fill);
  li.append(head, bar);
  return li;
}

// The web app says it is busy (429) with how long to wait: wait that long and ask again, a
// few times, before showing the refusal.
async function post(url, body) {
  for (let attempt = 0; ; attempt++) {
    const response = await fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    if (response.status !== 429 || attempt >= 3) return response;
    const wait = Math.min(Number(response.headers.get("Retry-After")) || 1, 10);
    showError("The web app is busy; asking again in " + wait + " s.");
    await new Promise((resolve) => setTimeout(resolve, wait * 1000));
    showError("");
  }
}

const predictForm = document.getElementById("predict");
if (predictForm) {
  predictForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = predictForm.querySelector("button");
    const list = document.getElementById("predictions");
    showError("");
    list.replaceChildren();
    button.disabled = true;
    try {
      const response = await post("/api/predict", { text: predictForm.text.value });
      if (signedOut(response)) return;
      if (!response.ok) return showError(await problem(response));
      const body = await response.json();
      list.replaceChildren(...body.predictions.map(prediction));
    } catch (error) {
      showError("The web app did not answer: " + error);
    } finally {
      button.disabled = false;
    }
  });
}

const askForm = document.getElementById("ask");
if (askForm) {
  askForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = askForm.querySelector("button");
    const answer = document.getElementById("answer");
    showError("");
    answer.textContent = "";
    answer.dataset.done = "false";
    button.disabled = true;
    try {
      const response = await post("/api/ask", { question: askForm.question.value });
      if (signedOut(response)) return;
      if (!response.ok) return showError(await problem(response));
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        answer.textContent += decoder.decode(value, { stream: true });
      }
    } catch (error) {
      showError("The web app did not answer: " + error);
    } finally {
      answer.dataset.done = "true";
      button.disabled = false;
    }
  });
}

// A run in progress (or stalled, which may write again): reload the page when its record has
// a new round or its state changes.
const runState = document.getElementById("run-state");
const following = ["in progress", "stalled"];
if (runState && following.includes(runState.dataset.state)) {
  const seen = Number(runState.dataset.rounds);
  const timer = setInterval(async () => {
    try {
      const response = await fetch("/api/runs/" + runState.dataset.run);
      if (!response.ok) return;
      const run = await response.json();
      if (run.rounds_completed !== seen || run.state !== runState.dataset.state) {
        clearInterval(timer);
        location.reload();
      }
    } catch (_) {
      // the web app restarting: try again at the next tick
    }
  }, 2000);
}

// The runs list: reloaded while a run on it is in progress.
if (document.querySelector("table.runs .state.in-progress")) {
  setTimeout(() => location.reload(), 5000);
}
