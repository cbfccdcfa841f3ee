"""Every Prometheus metric tasklab registers, in one place. Base units, low-cardinality labels.

Labels are bounded sets: task names, queue names, route templates, status codes, cache levels.
Never a job id, a user id, a hostname or a raw URL path.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
FAST_BUCKETS_S = (
    0.00001,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)

# --- HTTP -------------------------------------------------------------------------------------
HTTP_REQUESTS = Counter(
    "tasklab_http_requests_total", "HTTP requests answered.", ["method", "route", "status"]
)
HTTP_DURATION = Histogram(
    "tasklab_http_request_duration_seconds",
    "HTTP request duration.",
    ["method", "route"],
    buckets=LATENCY_BUCKETS_S,
)
HTTP_IN_PROGRESS = Gauge(
    "tasklab_http_requests_in_progress",
    "HTTP requests being served.",
    ["method"],
    multiprocess_mode="livesum",
)

# --- Jobs -------------------------------------------------------------------------------------
JOBS_SUBMITTED = Counter(
    "tasklab_jobs_submitted_total", "Jobs accepted by submit().", ["task", "queue", "via"]
)
JOBS_FINISHED = Counter(
    "tasklab_jobs_finished_total", "Jobs that reached a final state.", ["task", "queue", "status"]
)
JOB_DURATION = Histogram(
    "tasklab_job_duration_seconds",
    "Run time of one job attempt.",
    ["task", "queue"],
    buckets=LATENCY_BUCKETS_S,
)
JOB_QUEUE_WAIT = Histogram(
    "tasklab_job_queue_wait_seconds",
    "Time from submit (or retry) to the start of an attempt.",
    ["task", "queue"],
    buckets=LATENCY_BUCKETS_S,
)
JOB_RETRIES = Counter(
    "tasklab_job_retries_total", "Attempts that failed and were retried.", ["task", "queue"]
)
JOB_DEAD_LETTERS = Counter(
    "tasklab_job_dead_letters_total",
    "Jobs that exhausted their attempts and are DEAD.",
    ["task", "queue"],
)
JOB_RECOVERIES = Counter(
    "tasklab_job_recoveries_total", "Jobs re-published by the reaper.", ["reason"]
)
BROKER_PUBLISH_FAILURES = Counter(
    "tasklab_broker_publish_failures_total", "Publishes the broker did not accept.", ["reason"]
)
# livemax / livemin: a process that dies with its circuit open leaves no stale value behind.
FALLBACK_ACTIVE = Gauge(
    "tasklab_fallback_active",
    "1 while the publish circuit is open and jobs run locally.",
    multiprocess_mode="livemax",
)
# livemin: 0 while any live process of a host finds the link dead; a process that dies with
# its link down leaves no stale 0 behind.
LINK_UP = Gauge(
    "tasklab_link_up",
    "1 while this host's link to the broker or database answers probes (tasklab.links).",
    ["link"],
    multiprocess_mode="livemin",
)
LINK_LOST = Counter(
    "tasklab_link_lost_total", "Times a link to the broker or database was found dead.", ["link"]
)
LOCAL_EXECUTIONS = Counter(
    "tasklab_local_executions_total",
    "Jobs run by the in-process fallback executor.",
    ["task", "status"],
)
BUNDLE_HANDED_BACK = Counter(
    "tasklab_bundle_handed_back_total",
    "Jobs of a bundle given back to the broker because the bundle ran past its time budget.",
    ["task", "queue"],
)
DUPLICATE_DELIVERIES = Counter(
    "tasklab_duplicate_deliveries_total",
    "Deliveries skipped because the job was finished or leased.",
    ["task"],
)

# --- Queues and workers (exporter) ---------------------------------------------------------------
QUEUE_DEPTH = Gauge(
    "tasklab_queue_depth",
    "Messages waiting, all priority sub-queues summed.",
    ["queue"],
    multiprocess_mode="max",
)
QUEUE_DEPTH_BY_PRIORITY = Gauge(
    "tasklab_queue_depth_by_priority",
    "Messages waiting per priority.",
    ["queue", "priority"],
    multiprocess_mode="max",
)
# Per queue, and absent (no sample) where the broker cannot tell: RabbitMQ without its
# management API has no unacked count; Redis has no consumer count.
QUEUE_UNACKED = Gauge(
    "tasklab_queue_unacked",
    "Messages delivered to a consumer and not yet acknowledged.",
    ["queue"],
    multiprocess_mode="max",
)
QUEUE_CONSUMERS = Gauge(
    "tasklab_queue_consumers",
    "Consumers subscribed to the queue (RabbitMQ).",
    ["queue"],
    multiprocess_mode="max",
)
QUEUE_OLDEST_AGE = Gauge(
    "tasklab_queue_oldest_job_age_seconds",
    "Age of the oldest job still waiting to start.",
    ["queue"],
    multiprocess_mode="max",
)
JOBS_BY_STATUS = Gauge(
    "tasklab_jobs", "Job records by status.", ["status"], multiprocess_mode="max"
)
WORKERS_UP = Gauge("tasklab_workers_up", "Workers answering heartbeats.", multiprocess_mode="max")
WORKER_ACTIVE_TASKS = Gauge(
    "tasklab_worker_active_tasks", "Tasks running on all workers.", multiprocess_mode="max"
)
WORKER_PROCESSES = Gauge(
    "tasklab_worker_processes", "Pool processes over all workers.", multiprocess_mode="max"
)
WORKER_RSS = Gauge(
    "tasklab_worker_rss_bytes", "Resident memory of all worker processes.", multiprocess_mode="max"
)
WORKER_HEARTBEAT_AGE = Gauge(
    "tasklab_worker_heartbeat_age_seconds",
    "Age of the stalest worker heartbeat.",
    multiprocess_mode="max",
)
# Served by each worker node (tasklab.observe.node) from its process tree at scrape time.
NODE_RSS_NAME = "tasklab_worker_node_rss_bytes"
NODE_RSS_HELP = "Resident memory of this worker node's main process and all its pool children."
NODE_PROCESSES_NAME = "tasklab_worker_node_processes"
NODE_PROCESSES_HELP = "Processes in this worker node's process tree (main process included)."
BEAT_LAST_TICK = Gauge(
    "tasklab_beat_last_run_timestamp_seconds",
    "When beat last dispatched a scheduled task.",
    multiprocess_mode="max",
)

# Freshness of the exporter's figures, per source (broker, database, workers). A failed
# source's gauges are dropped, not kept at their last values.
EXPORTER_REFRESH_SUCCESS = Gauge(
    "tasklab_exporter_refresh_success",
    "1 if the exporter's last refresh of this source succeeded, 0 if it failed.",
    ["source"],
    multiprocess_mode="max",
)
EXPORTER_LAST_SUCCESS = Gauge(
    "tasklab_exporter_last_success_timestamp_seconds",
    "When the exporter last refreshed this source successfully.",
    ["source"],
    multiprocess_mode="max",
)

# --- Celery events, any Celery app (exporter; tasklab.observe.events) -----------------------
# Names and labels as celery-exporter's, so its dashboards work; every label is bounded there.
_CELERY_TASK_LABELS = ["name", "hostname", "queue_name"]
_CELERY_TASK_STATES = {
    "task-sent": "Task messages published (producers with task_send_sent_event).",
    "task-received": "Tasks a worker received.",
    "task-started": "Tasks a worker started.",
    "task-succeeded": "Tasks that succeeded.",
    "task-retried": "Tasks that failed and will be retried.",
    "task-rejected": "Tasks a worker rejected (requeued or dead-lettered).",
    "task-revoked": "Tasks revoked.",
}
CELERY_TASK_COUNTERS: dict[str, Counter] = {
    kind: Counter(f"celery_{kind.replace('-', '_')}", help_text, _CELERY_TASK_LABELS)
    for kind, help_text in _CELERY_TASK_STATES.items()
}
CELERY_TASK_COUNTERS["task-failed"] = Counter(
    "celery_task_failed",
    "Tasks whose run failed, by exception type.",
    [*_CELERY_TASK_LABELS, "exception"],
)
CELERY_TASK_RUNTIME = Histogram(
    "celery_task_runtime_seconds",
    "Run time of succeeded tasks (the worker's runtime field).",
    _CELERY_TASK_LABELS,
    buckets=LATENCY_BUCKETS_S,
)
CELERY_TASK_QUEUE_WAIT = Histogram(
    "celery_task_queue_wait_time_seconds",
    "From task-sent (or the end of its countdown/ETA) to task-started.",
    _CELERY_TASK_LABELS,
    buckets=LATENCY_BUCKETS_S,
)
CELERY_WORKER_UP = Gauge(
    "celery_worker_up",
    "1 while the worker's heartbeats arrive in time, 0 once they stop or it went offline.",
    ["hostname"],
    multiprocess_mode="max",
)
CELERY_WORKER_TASKS_ACTIVE = Gauge(
    "celery_worker_tasks_active",
    "Tasks the worker is running (its last heartbeat).",
    ["hostname"],
    multiprocess_mode="max",
)

# --- Cache ------------------------------------------------------------------------------------
CACHE_HITS = Counter("tasklab_cache_hits_total", "Cache hits.", ["cache", "level"])
CACHE_MISSES = Counter("tasklab_cache_misses_total", "Cache misses.", ["cache", "level"])
CACHE_LOADS = Counter("tasklab_cache_loader_calls_total", "Loader calls on a miss.", ["cache"])
CACHE_LOAD_DURATION = Histogram(
    "tasklab_cache_loader_duration_seconds",
    "Loader duration.",
    ["cache"],
    buckets=LATENCY_BUCKETS_S,
)
CACHE_L1_SIZE = Gauge(
    "tasklab_cache_l1_entries",
    "Entries in the in-process cache.",
    ["cache"],
    multiprocess_mode="livesum",
)
CACHE_EVICTIONS = Counter("tasklab_cache_evictions_total", "L1 evictions (size or TTL).", ["cache"])
CACHE_INVALIDATIONS = Counter(
    "tasklab_cache_invalidations_received_total",
    "Invalidation messages received from other processes.",
    ["cache"],
)
CACHE_ERRORS = Counter(
    "tasklab_cache_errors_total", "Cache backend errors (swallowed).", ["cache", "level"]
)
CACHE_REDIS_AVAILABLE = Gauge(
    "tasklab_cache_redis_available",
    "1 while the L2 circuit is closed.",
    ["cache"],
    multiprocess_mode="livemin",
)

# --- SQL --------------------------------------------------------------------------------------
SQL_DURATION = Histogram(
    "tasklab_sql_query_duration_seconds",
    "SQL statement duration.",
    ["operation"],
    buckets=LATENCY_BUCKETS_S,
)
SQL_SLOW_QUERIES = Counter(
    "tasklab_sql_slow_queries_total", "Statements slower than slow_query_ms.", ["operation"]
)

# --- Profiling --------------------------------------------------------------------------------
PROFILED_DURATION = Histogram(
    "tasklab_profiled_duration_seconds",
    "Duration of @profiled functions.",
    ["function"],
    buckets=LATENCY_BUCKETS_S,
)
