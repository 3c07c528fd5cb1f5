// Search by image on the page: a "more like this" button under each result ({"like": id}), and a picture
// dropped onto the search box (uploaded as multipart/form-data). Loaded before the page's own script, so
// render() finds moreLikeThis(); what needs that script (search, body, status) runs once the document is parsed.
"use strict";

// The search options of the form, less the words: what a search by image keeps.
function imageOptions() {
  const b = body();
  delete b.query;
  return b;
}

function moreLikeThis(id) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "like";
  button.dataset.like = id;
  button.textContent = "more like this";
  button.addEventListener("click", () => searchLike(id));
  return button;
}

function searchLike(id, push = true) {
  document.getElementById("q").value = "";
  if (push) history.pushState(null, "", location.pathname + "?like=" + encodeURIComponent(id));
  return search({ like: id, ...imageOptions() });
}

function searchDropped(file) {
  const form = new FormData();
  form.append("image", file, file.name || "image");
  form.append("options", JSON.stringify(imageOptions()));
  document.getElementById("q").value = "";
  return search(form);
}

window.addEventListener("DOMContentLoaded", () => {
  const box = document.getElementById("q");
  box.addEventListener("dragover", (ev) => {
    if (![...ev.dataTransfer.types].includes("Files")) return;
    ev.preventDefault();
    box.classList.add("drop");
  });
  box.addEventListener("dragleave", () => box.classList.remove("drop"));
  box.addEventListener("drop", (ev) => {
    box.classList.remove("drop");
    const file = [...ev.dataTransfer.files].find((f) => f.type.startsWith("image/")) || ev.dataTransfer.files[0];
    if (!file) return;
    ev.preventDefault();
    searchDropped(file);
  });
  const like = new URLSearchParams(location.search).get("like");  // a shared "more like this" link
  if (like) searchLike(like, false);
});
