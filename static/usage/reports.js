// Draws the stacked daily cost chart of /reports/ from the page's json_script data.
// Costs arrive as Decimal strings; they become numbers here only to be drawn, and
// the tooltip shows the exact string.
(function () {
  "use strict";
  var source = document.getElementById("chart-data");
  var canvas = document.getElementById("cost-chart");
  if (!source || !canvas || typeof Chart === "undefined") {
    return;
  }
  var data = JSON.parse(source.textContent);
  var palette = [
    "#2563eb", "#16a34a", "#dc2626", "#9333ea", "#ea580c",
    "#0891b2", "#ca8a04", "#db2777", "#4f46e5", "#65a30d", "#6b7280"
  ];
  var datasets = data.series.map(function (series, index) {
    return {
      label: series.label,
      exact: series.data,
      data: series.data.map(Number),
      backgroundColor: palette[index % palette.length],
      stack: "cost"
    };
  });
  var chart = new Chart(canvas, {
    type: "bar",
    data: { labels: data.labels, datasets: datasets },
    options: {
      animation: false,
      maintainAspectRatio: false,
      interaction: { mode: "index", intersect: false },
      scales: {
        x: { stacked: true },
        y: { stacked: true, title: { display: true, text: "USD" } }
      },
      plugins: {
        tooltip: {
          callbacks: {
            label: function (item) {
              return item.dataset.label + ": $" + item.dataset.exact[item.dataIndex];
            }
          }
        }
      }
    }
  });
  canvas.dataset.drawn = String(chart.data.datasets.length);
})();
