-- Time features are UTC: hour_idx = hour of day + 1 and weekday_idx = ISO weekday
-- (1 = Monday), recomputed here with integer arithmetic on unix seconds (1970-01-01 was a
-- Thursday). Also checks that the standard-SQL (default__) time macros agree with the
-- adapter's ones, so the marts keep their values on another engine. Returns offending rows.

with

samples as (

    select event_id, ts, hour_idx, weekday_idx
    from {{ ref('fct_ctr_samples') }}

),

expected as (

    select
        *,
        {{ dbt.cast('floor(mod(mod(ts, 86400) + 86400, 86400) / 3600)', dbt.type_int()) }} + 1 as expected_hour_idx,
        {{ dbt.cast('mod(mod(' ~ dbt.cast('floor(ts / 86400.0)', dbt.type_bigint()) ~ ' + 3, 7) + 7, 7) + 1', dbt.type_int()) }} as expected_weekday_idx,
        {{ recsys.default__utc_hour('ts') }} + 1 as portable_hour_idx,
        {{ recsys.default__utc_iso_weekday('ts') }} as portable_weekday_idx,
        {{ recsys.utc_year('ts') }} as event_year,
        {{ recsys.default__utc_year('ts') }} as portable_event_year
    from samples

)

select *
from expected
where hour_idx <> expected_hour_idx
   or weekday_idx <> expected_weekday_idx
   or hour_idx <> portable_hour_idx
   or weekday_idx <> portable_weekday_idx
   or event_year <> portable_event_year
