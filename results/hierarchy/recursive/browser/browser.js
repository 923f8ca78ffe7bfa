"use strict";
// Feature details are pre-rendered HTML (bench/templates/feature.html.j2, escaped there) in data/<unit>-<k>.js chunks,
// loaded on demand by a <script> tag.
var FB = {chunks: {}, data: {}, pending: {},
  add: function (unit, chunk, features) {
    for (var f in features) FB.data[f] = features[f];
    FB.chunks[chunk] = true;
    (FB.pending[chunk] || []).forEach(function (cb) { cb(); });
    delete FB.pending[chunk];
  }
};
function load(chunk, cb) {
  var unit = document.body.getAttribute("data-unit");
  if (FB.chunks[chunk]) { cb(); return; }
  (FB.pending[chunk] = FB.pending[chunk] || []).push(cb);
  if (FB.pending[chunk].length > 1) return;
  var s = document.createElement("script");
  s.src = "data/" + unit + "-" + chunk + ".js";
  document.head.appendChild(s);
}
function render(f) {
  var box = document.getElementById("detail");
  if (FB.data[f] === undefined) {
    box.textContent = "";
    var p = document.createElement("p");
    p.className = "hint";
    p.textContent = "No data for feature " + f + ".";
    box.appendChild(p);
    return;
  }
  box.innerHTML = FB.data[f];
  box.scrollTop = 0;
}
function show() {
  var m = /f=(\d+)/.exec(location.hash);
  if (!m) return;
  var row = document.querySelector('#features tbody tr[data-f="' + m[1] + '"]');
  document.querySelectorAll("#features tbody tr.sel").forEach(function (r) { r.classList.remove("sel"); });
  if (!row) { render(m[1]); return; }
  row.classList.add("sel");
  load(row.getAttribute("data-chunk"), function () { render(m[1]); });
}
function cellValue(row, col, num) {
  var x = row.cells[col].textContent;
  if (!num) return x;
  x = parseFloat(x);
  return isNaN(x) ? -Infinity : x;
}
function setup() {
  var table = document.getElementById("features");
  if (!table) return;
  var body = table.tBodies[0];
  body.addEventListener("click", function (e) {
    var tr = e.target.closest("tr");
    if (tr) location.hash = "f=" + tr.getAttribute("data-f");
  });
  document.getElementById("filter").addEventListener("input", function (e) {
    var q = e.target.value.toLowerCase();
    body.querySelectorAll("tr").forEach(function (tr) {
      tr.style.display = !q || tr.textContent.toLowerCase().indexOf(q) >= 0 ? "" : "none";
    });
  });
  table.tHead.querySelectorAll("th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var num = th.getAttribute("data-sort") === "n", dir = th.getAttribute("data-dir") === "desc" ? 1 : -1;
      th.setAttribute("data-dir", dir === 1 ? "asc" : "desc");
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = cellValue(a, col, num), y = cellValue(b, col, num);
        return dir * (num ? x - y : String(x).localeCompare(String(y)));
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
  window.addEventListener("hashchange", show);
  show();
}
setup();
