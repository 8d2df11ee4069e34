// TokenOpen dashboard: Plotly charts from the page's JSON (no inline script: CSP), in the
// console's colours and light/dark theme, with a credits / requests / tokens switch.
(function () {
  "use strict";
  var source = document.getElementById("chart-data");
  if (!source || !window.Plotly) return;
  var data = JSON.parse(source.textContent);
  var css = getComputedStyle(document.documentElement);
  function v(name) { return css.getPropertyValue(name).trim(); }
  var dark = window.matchMedia && window.matchMedia("(prefers-color-scheme: dark)").matches;

  // One meaning, one colour, in every chart: red is only ever "failed".
  var COLORS = dark ? {
    ok: "#7196f4", failed: "#f07a70", input: "#2dd4bf", output: "#b692f6",
    credits: "#fbbf24", requests: "#7196f4", tokens: "#2dd4bf"
  } : {
    ok: "#2f5bd3", failed: "#c4320a", input: "#0e7c70", output: "#6941c6",
    credits: "#b45309", requests: "#2f5bd3", tokens: "#0e7c70"
  };
  var UNITS = {credits: "credits", requests: "requests", tokens: "tokens"};
  var phone = window.matchMedia && window.matchMedia("(max-width: 720px)").matches;
  // On phones the mode bar covered the top of every chart; there, no mode bar.
  var config = {displaylogo: false, responsive: true, displayModeBar: phone ? false : "hover"};

  function axis(extra) {
    return Object.assign({gridcolor: v("--border"), linecolor: v("--border-strong"),
      zerolinecolor: v("--border-strong"), tickfont: {color: v("--muted")},
      title: {font: {color: v("--muted")}}, automargin: true}, extra || {});
  }
  function layout(extra) {
    return Object.assign({
      margin: {t: 10, r: 10, b: 40, l: 50}, height: 300,
      font: {family: v("--font") || "system-ui, sans-serif", color: v("--text")},
      legend: {orientation: "h", y: -0.2, font: {color: v("--text")}},
      paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "rgba(0,0,0,0)",
      hoverlabel: {bgcolor: v("--surface"), bordercolor: v("--border-strong"),
                   font: {color: v("--text")}},
      separators: ".,",
      xaxis: axis(), yaxis: axis({tickformat: ",~r", rangemode: "tozero"})
    }, extra || {});
  }

  Plotly.newPlot("chart-requests", [
    {type: "bar", name: "Succeeded", x: data.days, y: data.requests, marker: {color: COLORS.ok},
     hovertemplate: "%{x}<br>%{y:,} succeeded<extra></extra>"},
    {type: "bar", name: "Failed", x: data.days, y: data.failed, marker: {color: COLORS.failed},
     hovertemplate: "%{x}<br>%{y:,} failed<extra></extra>"}
  ], layout({barmode: "stack"}), config);
  Plotly.newPlot("chart-tokens", [
    {type: "bar", name: "Input", x: data.days, y: data.prompt_tokens, marker: {color: COLORS.input},
     hovertemplate: "%{x}<br>%{y:,} input tokens<extra></extra>"},
    {type: "bar", name: "Output", x: data.days, y: data.completion_tokens, marker: {color: COLORS.output},
     hovertemplate: "%{x}<br>%{y:,} output tokens<extra></extra>"}
  ], layout({barmode: "stack"}), config);
  Plotly.newPlot("chart-credits", [
    {type: "scatter", mode: "lines+markers", name: "Credits", x: data.days, y: data.credits,
     fill: "tozeroy", line: {color: COLORS.credits}, marker: {color: COLORS.credits},
     hovertemplate: "%{x}<br>%{y:,.4~f} credits<extra></extra>"}
  ], layout({showlegend: false}), config);

  function breakdown(id, rows, metric) {
    var el = document.getElementById(id);
    if (!el) return;
    var labels = rows.map(function (r) { return r.label; }).reverse();
    var values = rows.map(function (r) { return r[metric]; }).reverse();
    var format = metric === "credits" ? ",.4~f" : ",";
    Plotly.react(el, [{
      type: "bar", orientation: "h", name: UNITS[metric], y: labels, x: values,
      marker: {color: COLORS[metric]},
      customdata: rows.map(function (r) { return [r.requests, r.tokens, r.credits]; }).reverse(),
      hovertemplate: "%{y}<br>%{customdata[0]:,} requests<br>%{customdata[1]:,} tokens" +
                     "<br>%{customdata[2]:,.4~f} credits<extra></extra>"
    }], layout({showlegend: false, height: Math.max(200, 60 + 28 * rows.length),
                margin: {t: 10, r: 10, b: 40, l: 10},
                yaxis: axis({automargin: true, type: "category"}),
                xaxis: axis({title: {text: UNITS[metric], font: {color: v("--muted")}},
                             tickformat: format === "," ? ",~r" : ",~r", rangemode: "tozero"})}),
      config);
  }

  function drawBreakdowns(metric) {
    Object.keys(data.breakdowns).forEach(function (name) {
      breakdown("chart-" + name, data.breakdowns[name][metric], metric);
    });
    document.querySelectorAll("#metric-switch [data-metric]").forEach(function (link) {
      if (link.getAttribute("data-metric") === metric) link.setAttribute("aria-current", "true");
      else link.removeAttribute("aria-current");
    });
  }
  drawBreakdowns(data.metric);

  // The switch redraws in place; its links still work (server-side) without JavaScript.
  document.addEventListener("click", function (event) {
    var link = event.target.closest("#metric-switch [data-metric]");
    if (!link) return;
    event.preventDefault();
    data.metric = link.getAttribute("data-metric");
    drawBreakdowns(data.metric);
    if (window.history && history.replaceState) history.replaceState(null, "", link.href);
  });
})();
