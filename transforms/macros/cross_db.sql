{#
  Cross-database helpers. Each macro dispatches through adapter.dispatch(name, 'recsys'):
  `duckdb__*` is what the embedded warehouse runs, `spark__*` what the Spark target runs
  (RECSYS_WAREHOUSE=spark), `default__*` is written in standard SQL (checked against
  Postgres/Trino semantics) so the models can move to another target.
  Timestamps in the raw layer are unix seconds (BIGINT) and are always read as UTC.
#}

{# 64-bit IEEE float. dbt.type_float() renders `float`, which DuckDB reads as 32-bit REAL. #}
{% macro type_double() -%}
  {{ return(adapter.dispatch('type_double', 'recsys')()) }}
{%- endmacro %}

{% macro duckdb__type_double() -%}
  double
{%- endmacro %}

{% macro default__type_double() -%}
  double precision
{%- endmacro %}

{% macro spark__type_double() -%}
  double
{%- endmacro %}


{# unix seconds -> timestamp without time zone, in UTC (independent of the session TimeZone) #}
{% macro epoch_to_timestamp(epoch_seconds) -%}
  {{ return(adapter.dispatch('epoch_to_timestamp', 'recsys')(epoch_seconds)) }}
{%- endmacro %}

{% macro duckdb__epoch_to_timestamp(epoch_seconds) -%}
  make_timestamp(cast({{ epoch_seconds }} as bigint) * 1000000)
{%- endmacro %}

{% macro default__epoch_to_timestamp(epoch_seconds) -%}
  {{ dbt.dateadd('second', epoch_seconds, "cast('1970-01-01 00:00:00' as " ~ dbt.type_timestamp() ~ ")") }}
{%- endmacro %}

{# Spark's timestamp is shown in the session time zone; the profile pins it to UTC, and the
   utc_* macros below do not depend on it at all. #}
{% macro spark__epoch_to_timestamp(epoch_seconds) -%}
  timestamp_seconds(cast({{ epoch_seconds }} as bigint))
{%- endmacro %}


{# hour of day 0..23 (UTC) of unix seconds, as integer #}
{% macro utc_hour(epoch_seconds) -%}
  {{ return(adapter.dispatch('utc_hour', 'recsys')(epoch_seconds)) }}
{%- endmacro %}

{% macro duckdb__utc_hour(epoch_seconds) -%}
  cast(hour({{ recsys.epoch_to_timestamp(epoch_seconds) }}) as integer)
{%- endmacro %}

{% macro default__utc_hour(epoch_seconds) -%}
  cast(extract(hour from {{ recsys.epoch_to_timestamp(epoch_seconds) }}) as {{ dbt.type_int() }})
{%- endmacro %}

{# integer arithmetic on unix seconds: the same on every cluster, whatever its session time zone #}
{% macro spark__utc_hour(epoch_seconds) -%}
  cast(floor(mod(mod(cast({{ epoch_seconds }} as bigint), 86400) + 86400, 86400) / 3600) as int)
{%- endmacro %}


{# ISO weekday 1 (Monday) .. 7 (Sunday), UTC, as integer #}
{% macro utc_iso_weekday(epoch_seconds) -%}
  {{ return(adapter.dispatch('utc_iso_weekday', 'recsys')(epoch_seconds)) }}
{%- endmacro %}

{% macro duckdb__utc_iso_weekday(epoch_seconds) -%}
  cast(isodow({{ recsys.epoch_to_timestamp(epoch_seconds) }}) as integer)
{%- endmacro %}

{# 1970-01-01 was a Thursday (ISO 4); the double mod keeps pre-1970 days in 0..6 #}
{% macro default__utc_iso_weekday(epoch_seconds) -%}
  cast(mod(mod(cast(floor({{ epoch_seconds }} / 86400.0) as {{ dbt.type_bigint() }}) + 3, 7) + 7, 7) + 1 as {{ dbt.type_int() }})
{%- endmacro %}


{# calendar year (UTC) of unix seconds, as integer #}
{% macro utc_year(epoch_seconds) -%}
  {{ return(adapter.dispatch('utc_year', 'recsys')(epoch_seconds)) }}
{%- endmacro %}

{% macro duckdb__utc_year(epoch_seconds) -%}
  cast(year({{ recsys.epoch_to_timestamp(epoch_seconds) }}) as integer)
{%- endmacro %}

{% macro default__utc_year(epoch_seconds) -%}
  cast(extract(year from {{ recsys.epoch_to_timestamp(epoch_seconds) }}) as {{ dbt.type_int() }})
{%- endmacro %}

{# the UTC calendar day as a DATE (no time zone), then its year #}
{% macro spark__utc_year(epoch_seconds) -%}
  cast(year(date_from_unix_date(cast(floor({{ epoch_seconds }} / 86400.0) as int))) as int)
{%- endmacro %}


{# number of elements of an array/list (NULL for a NULL list) #}
{% macro list_length(list_expr) -%}
  {{ return(adapter.dispatch('list_length', 'recsys')(list_expr)) }}
{%- endmacro %}

{% macro duckdb__list_length(list_expr) -%}
  cast(len({{ list_expr }}) as integer)
{%- endmacro %}

{% macro default__list_length(list_expr) -%}
  cast(cardinality({{ list_expr }}) as {{ dbt.type_int() }})
{%- endmacro %}

{# size(NULL) is -1 on Spark unless ANSI mode is on (dbt-spark turns it off): keep NULL #}
{% macro spark__list_length(list_expr) -%}
  cast(case when {{ list_expr }} is null then null else size({{ list_expr }}) end as int)
{%- endmacro %}


{# an empty integer array/list literal #}
{% macro empty_int_list() -%}
  {{ return(adapter.dispatch('empty_int_list', 'recsys')()) }}
{%- endmacro %}

{% macro duckdb__empty_int_list() -%}
  cast([] as integer[])
{%- endmacro %}

{% macro default__empty_int_list() -%}
  cast(array[] as integer array)
{%- endmacro %}

{% macro spark__empty_int_list() -%}
  cast(array() as array<int>)
{%- endmacro %}


{# 1.0 when `condition` holds, else 0.0: its avg() is the fraction of rows where it holds.
   Spark reads the literal 1.0 as DECIMAL(2,1) and averages decimals to 5 places (1/3 ->
   0.33333), so it gets doubles, whose average is what DuckDB returns to the last bit. #}
{% macro indicator(condition) -%}
  {{ return(adapter.dispatch('indicator', 'recsys')(condition)) }}
{%- endmacro %}

{% macro default__indicator(condition) -%}
  case when {{ condition }} then 1.0 else 0.0 end
{%- endmacro %}

{% macro spark__indicator(condition) -%}
  case when {{ condition }} then cast(1 as double) else cast(0 as double) end
{%- endmacro %}
